"""An image folder as a labelled (or unlabelled) set of files, decoded on demand with the artifact's preprocessing.

Layouts: an ImageFolder (`root/<class>/<image>`, class folders named by class index or by a label of
`labels_file`) or a flat folder (`root/<image>`, no labels). The walk and the extension filter are
torchvision's (`torchvision.datasets.folder`): files whose name ends in one of `IMG_EXTENSIONS`; hidden
files and folders (names starting with ".") are ignored, symlinked files and folders are followed.

Reading the folder decodes nothing; `ImageSet.pixels` decodes only the indices asked for, so memory stays
bounded by one batch. A file that does not decode is skipped and remembered in `ImageSet.unreadable`;
`pixels` never raises for it. Whether anything decoded at all is the caller's check, `check_decoded`,
which raises a one-line InvalidInputError (exit 2 at the CLI) before any metric is computed."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, has_file_allowed_extension, make_dataset

from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.errors import InvalidInputError, display_path
from tome_deploy.input_files import open_input, read_input_bytes
from tome_deploy.preprocess import eval_transform

_CHUNK = 1 << 20  # bytes read at a time for the fingerprint


@dataclass(frozen=True)
class DataConfig:
    """The image preprocessing an image input spec records (its shape and preprocessing keys)."""

    input_size: list[int]  # [3, H, W]
    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float

    @classmethod
    def of(cls, spec: InputSpec, what: str) -> DataConfig:
        """The preprocessing of an image input; InvalidInputError naming `what` (the command) for another kind:
        quality is measured on folders of images."""
        if spec.kind != "image":
            raise InvalidInputError(
                f"{what} measures quality on a folder of images, but this model takes {spec.kind_phrase} "
                f"input {spec.describe_shape()}; use an image model"
            )
        pre = spec.preprocessing
        return cls(list(spec.shape), list(pre["mean"]), list(pre["std"]), pre["interpolation"], pre["crop_pct"])


@dataclass(frozen=True)
class ImageSet:
    """The image files under `root`, in a fixed order, with their class index when the layout has classes."""

    root: Path
    files: tuple[str, ...]  # relative to root, posix separators; by class index, then by path
    labels: Optional[tuple[int, ...]]  # class index per file; None for a flat folder
    num_classes: Optional[int]
    fingerprint: str  # sha256 hex of (relative path + file bytes) of every file, in order
    loaded: list[str] = field(default_factory=list, compare=False)  # every decode attempt, in order
    unreadable: set[str] = field(default_factory=set, compare=False)  # files that failed to decode

    def pixels(self, indices: Sequence[int], config: DataConfig) -> tuple[np.ndarray, list[int]]:
        """Decode and preprocess files[i] for i in `indices` -> (float32 [n_ok, 3, H, W], the indices that
        decoded, in the order asked). A file that fails to decode is skipped and added to `unreadable`."""
        images, decoded = [], []
        for index in indices:
            relative = self.files[index]
            self.loaded.append(relative)
            try:
                image = default_loader(str(self.root / relative))
            except (OSError, ValueError, SyntaxError):  # PIL's errors for a truncated, corrupt or unknown file
                self.unreadable.add(relative)
                continue
            images.append(
                eval_transform(image, config.input_size, config.mean, config.std, config.crop_pct, config.interpolation)
            )
            decoded.append(index)
        if not images:
            return np.zeros((0, *config.input_size), np.float32), decoded
        return np.stack(images).astype(np.float32, copy=False), decoded


def check_decoded(images: ImageSet, decoded: int) -> None:
    """Refuse (InvalidInputError) a pass over `images` in which no file decoded; `decoded` counts those that did."""
    if decoded == 0:
        example = sorted(images.unreadable)[0] if images.unreadable else images.files[0]
        raise InvalidInputError(
            f"none of the {len(images.unreadable)} image files read under {display_path(images.root)} could be "
            f"decoded (e.g. {example}); pass a folder of readable images"
        )


def read_image_folder(root: str | Path, labels_file: Optional[str | Path] = None) -> ImageSet:
    """The image files under `root` (ImageFolder or flat layout) and their fingerprint; decodes nothing.

    Raises InvalidInputError for a missing path, a file, a folder without image files, class folders that
    map to no class, a folder that mixes images and class folders, and a labels_file that cannot be read."""
    root = Path(root)
    where = display_path(root)
    if not root.exists():
        raise InvalidInputError(f"--data {where} does not exist; pass a folder of images")
    if not root.is_dir():
        raise InvalidInputError(f"--data {where} is a file; pass the folder that holds the images")
    names = _read_labels(Path(labels_file)) if labels_file is not None else None
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _hidden(entry.name))
    top_images = sorted(entry.name for entry in os.scandir(root) if entry.is_file() and _is_image(entry.name))
    if folders and top_images:
        raise InvalidInputError(
            f"--data {where} holds both images ({top_images[0]}) and class folders ({folders[0]}); "
            "use one layout: root/<class>/<image> or root/<image>"
        )
    if folders:
        files, labels, num_classes = _image_folder(root, folders, names)
    else:
        if labels_file is not None:
            raise InvalidInputError(
                f"--labels was given but --data {where} has no class folders; lay it out as root/<class>/<image>"
            )
        files, labels, num_classes = tuple(top_images), None, None
    if not files:
        raise InvalidInputError(
            f"--data {where} holds no image files ({', '.join(IMG_EXTENSIONS)}); pass a folder of images"
        )
    return ImageSet(root, files, labels, num_classes, fingerprint_files(root, files))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _hidden(name) and has_file_allowed_extension(name, IMG_EXTENSIONS)


def _is_visible_image(path: str) -> bool:
    """torchvision's `is_valid_file`: an image file with no hidden folder on its way below the class folder."""
    return _is_image(os.path.basename(path)) and not any(_hidden(part) for part in Path(path).parts)


MAX_LABELS_BYTES = 16 << 20  # a labels file is read whole; ImageNet-21k's names take ~0.5 MB


def _read_labels(path: Path) -> list[str]:
    """One label per line (surrounding spaces dropped); line number = class index."""
    try:
        text = read_input_bytes(path, "--labels", MAX_LABELS_BYTES).decode("utf-8")
        names = [line.strip() for line in text.splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(
            f"--labels {display_path(path)} cannot be read ({type(err).__name__}); pass a UTF-8 text file, one label per line"
        ) from None
    if not any(names):
        raise InvalidInputError(f"--labels {display_path(path)} is empty; write one label per line")
    return names


def _class_index(folder: str, names: Optional[list[str]]) -> Optional[int]:
    """A class folder's index: its line in the labels file, else its name as a whole number (below the
    number of labels when there is a labels file); None when it maps to no class."""
    if names is not None and folder in names:
        return names.index(folder)
    if folder.isascii() and folder.isdigit() and (names is None or int(folder) < len(names)):
        return int(folder)
    return None


def _image_folder(
    root: Path, folders: list[str], names: Optional[list[str]]
) -> tuple[tuple[str, ...], tuple[int, ...], int]:
    """(files, labels, num_classes) of root/<class>/<image>, ordered by class index then path."""
    class_to_idx = {folder: _class_index(folder, names) for folder in folders}
    unknown = [folder for folder, index in class_to_idx.items() if index is None]
    if unknown:
        fix = "a label of --labels or a class index" if names is not None else "a class index, or pass --labels FILE"
        raise InvalidInputError(
            f"class folder{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} "
            f"map{'' if len(unknown) > 1 else 's'} to no class (--data {display_path(root)}); name each folder {fix}"
        )
    indices = [index for index in class_to_idx.values() if index is not None]
    if len(set(indices)) < len(indices):
        raise InvalidInputError(
            f"two class folders under --data {display_path(root)} name the same class; keep one folder per class"
        )
    samples = make_dataset(
        str(root),
        {folder: index for folder, index in class_to_idx.items() if index is not None},
        is_valid_file=lambda path: _is_visible_image(os.path.relpath(path, root)),
        allow_empty=True,
    )
    rows = sorted((label, Path(path).relative_to(root).as_posix()) for path, label in samples)
    num_classes = len(names) if names is not None else max(indices) + 1
    return tuple(path for _, path in rows), tuple(label for label, _ in rows), num_classes


def fingerprint_files(root: Path, files: Sequence[str]) -> str:
    """sha256 hex over each file's relative path then its bytes, in order; InvalidInputError for a file
    that cannot be opened (a broken symlink, no permission)."""
    digest = hashlib.sha256()
    for relative in files:
        digest.update(relative.encode())
        try:
            with open_input(root / relative, "image") as stream:  # a FIFO named like an image is refused
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except OSError as err:
            raise InvalidInputError(
                f"{display_path(root / relative)} cannot be read ({err.strerror or type(err).__name__}); "
                "fix its permissions or remove it from --data"
            ) from None
    return digest.hexdigest()

"""tome-visualize: draw which patches of an image (or tubelets of a video clip) ToMe merged together."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from tome_deploy.cli.common import (
    add_debug_argument,
    add_model_arguments,
    add_schedule_arguments,
    exit_codes_help,
    model_source,
    run_command,
    say,
    say_clamp_note,
    schedule_spec,
)
from tome_deploy.errors import InvalidInputError

STYLES = ("mean", "overlay")  # tome_deploy.visualize.STYLES, repeated here so --help stays import-free
DEFAULT_R = "16"
DEFAULT_WIDTH = 384  # auto --scale upscales small inputs to at least this many pixels per side
MAX_SIDE = 8192  # the largest side of the drawing (model input side x --scale), in pixels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-visualize",
        description="Run a ToMe ViT on an image (or a video model on a clip) and draw which patches (tubelets) were "
        "merged into the same token.",
        epilog=exit_codes_help(),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "image",
        metavar="IMAGE",
        help="image file (PNG, JPEG, ...); it goes through the model's eval transform. For a video model: a "
        "folder of frames (in name order) or a GIF, from which the model's frame count is sampled uniformly. For an "
        "audio model: a .npy log-mel spectrogram [time, mel] as its feature extractor computes it",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH.png",
        help="PNG file to write; for a video model a PNG (every frame in a row) or a GIF (an animation)",
    )
    add_schedule_arguments(parser, DEFAULT_R)
    parser.add_argument("--img-size", type=int, metavar="N", help="input resolution (default: the model's)")
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="mean",
        help="mean: each group filled with its mean colour (default); overlay: a distinct tint per group",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=None,
        metavar="K",
        help=f"upscale the drawing K times (default: enough for {DEFAULT_WIDTH} px; the drawing's side may be at most {MAX_SIDE} px)",
    )
    parser.add_argument(
        "--merges-only", action="store_true", help="write only the merge drawing, not the input next to it"
    )
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _visualize(args), args.debug)


def _check_output(args: argparse.Namespace) -> Path:
    from tome_deploy.output_files import check_outputs

    if Path(args.output).suffix.lower() not in (".png", ".gif"):
        raise InvalidInputError(
            f"-o {args.output} must name a .png file (or, for a video model, a .png or .gif); e.g. -o merges.png"
        )
    return check_outputs({"-o": args.output}, inputs=(args.image, args.source, args.checkpoint))["-o"]


def check_scale(scale: Optional[int], side: Optional[int]) -> None:
    """--scale is a positive integer whose drawing (`side` x scale per side, `side` 1 while unknown) fits MAX_SIDE."""
    if scale is None:
        return
    if scale < 1:
        raise InvalidInputError(f"--scale must be a positive integer, got {scale}")
    side = side if side is not None and side > 0 else 1
    if side * scale > MAX_SIDE:
        raise InvalidInputError(
            f"--scale {scale} would draw a {side * scale} px side from a {side} px input; the largest is {MAX_SIDE} px, "
            f"so pass --scale at most {max(1, MAX_SIDE // side)}"
        )


def _visualize(args: argparse.Namespace) -> int:
    output = _check_output(args)
    r_spec = schedule_spec(args, DEFAULT_R)
    source = model_source(args)  # checks --img-size
    check_scale(args.scale, args.img_size)

    from tome_deploy.models.adapter import checked_input_spec
    from tome_deploy.models.loading.dispatch import load_model
    from tome_deploy.models.patch import apply_tome
    from tome_deploy.viz import (
        merges as vis,
    )
    from tome_deploy.viz.video import is_clip_path

    clip = is_clip_path(args.image)
    spectrogram_file = Path(args.image).suffix.lower() == ".npy"
    # before the model: a bad image fails fast
    image = None if clip or spectrogram_file else vis.load_image(args.image)
    report = (lambda _: None) if args.quiet else say
    report(f"Loading {args.source} ...")
    loaded = load_model(source)
    spec = checked_input_spec(loaded.adapter, loaded.model, args.source)
    if spectrogram_file != (spec.kind == "audio_spectrogram"):
        raise InvalidInputError(
            f"{args.image} is {'a .npy spectrogram' if spectrogram_file else 'an image'}, but {args.source} takes "
            f"{spec.kind_phrase} input {spec.describe_shape()}; pass "
            + ("a .npy log-mel spectrogram of that shape" if spec.kind == "audio_spectrogram" else "an image file")
        )
    tome, schedule = apply_tome(loaded.model, r_spec, "scatter", strict=args.strict, adapter=loaded.adapter)
    say_clamp_note(schedule, report)
    if spec.kind == "video" or clip:
        return _visualize_clip(args, output, loaded, tome, schedule, spec, report)
    if output.suffix.lower() == ".gif":
        raise InvalidInputError(f"-o {args.output}: an image model's drawing is a PNG; e.g. -o merges.png")
    if spectrogram_file:
        from tome_deploy.viz import spectrogram as audio

        values = audio.load_spectrogram(args.image, spec.shape)  # [time, mel], header checked first
        groups, sizes = vis.merge_groups(tome, values[None], batched=True)
        rgb, groups = audio.spectrogram_rgb(values), audio.groups_as_drawn(groups)  # low frequencies at the bottom
    else:
        assert image is not None  # neither a clip nor a spectrogram file: loaded above
        pixels, rgb = vis.model_input(image, spec)
        groups, sizes = vis.merge_groups(tome, pixels)

    height, width = rgb.shape[:2]
    check_scale(args.scale, max(height, width))  # the model's own input size, known now: before drawing anything
    scale = args.scale or max(1, -(-DEFAULT_WIDTH // max(height, width)))
    drawing = vis.render_merges(rgb, groups, style=args.style, scale=scale)
    if not args.merges_only:
        from PIL import Image

        crop = Image.fromarray(rgb).resize((width * scale, height * scale), Image.Resampling.BICUBIC)
        drawing = vis.side_by_side([crop, drawing])
    vis.save_png(drawing, output)

    grid_h, grid_w = groups.shape
    name = loaded.arch or type(loaded.model).__name__
    report(
        f"{name}: {grid_h}x{grid_w} = {grid_h * grid_w} patches -> {len(sizes)} merged tokens after "
        f"{schedule.depth} blocks (r per layer {list(schedule.effective)}); largest token covers {int(sizes.max())} patches"
    )
    report(f"wrote {output} ({drawing.width}x{drawing.height})")
    if loaded.random_weights:
        report(
            f"note: {name} has random weights (seed {loaded.seed}): merges then follow colour and position, not "
            "meaning; pass --pretrained or --checkpoint to see what a trained model merges"
        )
    return 0


MAX_SHEET_SIDE = 32768  # px: the widest PNG of a clip's frames in a row


def _visualize_clip(args, output: Path, loaded, tome, schedule, spec, report) -> int:
    """A video model on a clip: every frame painted with the groups of its tubelet step, as one PNG row of
    frames (under the input frames unless --merges-only) or an animated GIF."""
    from tome_deploy.viz import merges as vis
    from tome_deploy.viz import video

    if spec.kind != "video":
        raise InvalidInputError(
            f"{args.image} is a clip, but this model takes {spec.kind_phrase} input {spec.describe_shape()}; "
            "pass an image file"
        )
    if not video.is_clip_path(args.image):
        raise InvalidInputError(
            f"this model takes a video clip {spec.describe_shape()}; pass a folder of frames or a GIF, not {args.image}"
        )
    frames = spec.axis("frames")
    pixels, rgb = video.clip_input(video.load_clip(args.image, frames), spec)
    groups, sizes = video.clip_merge_groups(tome, pixels)
    side = max(rgb.shape[1:3])
    check_scale(args.scale, side)
    scale = args.scale or max(1, -(-DEFAULT_WIDTH // side))
    gif = output.suffix.lower() == ".gif"
    if not gif and frames * side * scale > MAX_SHEET_SIDE:
        raise InvalidInputError(
            f"{frames} frames of {side * scale} px make a PNG over {MAX_SHEET_SIDE} px wide; write a .gif or pass a "
            f"smaller --scale"
        )
    drawings = video.render_clip(rgb, groups, style=args.style, scale=scale)
    inputs = [] if args.merges_only else video.scaled_frames(rgb, scale)
    if gif:
        video.save_gif([vis.side_by_side([*pair]) for pair in zip(inputs, drawings)] if inputs else drawings, output)
    else:
        vis.save_png(video.clip_sheet([row for row in (inputs, drawings) if row]), output)
    steps, rows, cols = groups.shape
    name = loaded.arch or type(loaded.model).__name__
    report(
        f"{name}: {steps}x{rows}x{cols} = {groups.size} tubelets -> {len(sizes)} merged tokens after "
        f"{schedule.depth} blocks (r per layer {list(schedule.effective)}); largest token covers {int(sizes.max())} tubelets"
    )
    report(f"wrote {output} ({frames} frames)")
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()

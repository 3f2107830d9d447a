"""load_model: the source form that claims a ModelSource, then that form's loader does the whole load.

Model sources are a registry. Each family module that loads models defines a `SOURCE_FORM`
(`SourceForm` in loading/source.py: a name, a cheap `claims(source)` test and the loader), and
SOURCE_FORM_MODULES lists those modules in the order their forms are tried: the prefixed and folder
forms first, timm last as the fallback that claims every other name and file. Importing a family module
imports no model library (transformers, open_clip are imported by its loader), so picking a form costs
string and file-system checks only. To add a source form (e.g. `torchvision:<builder>`), give the family
module a SOURCE_FORM and list the module here, before timm.

Files are only ever read. `torch.load` always runs with `weights_only=True`; a pickled module is
unpickled only when every global it needs is on safe_pickle.py's allowlist (nn.Module and Enum classes
from torch/timm plus a few plain containers), unless the caller opts out with `trust_pickle=True`."""

from __future__ import annotations

import importlib

from tome_deploy.models.loading.source import LoadedModel, ModelSource, SourceForm

SOURCE_FORM_MODULES = (
    "tome_deploy.models.open_clip_visual",  # open_clip:<arch>
    "tome_deploy.models.torchvision_vit",  # torchvision:<builder>
    "tome_deploy.models.hf_video",  # a save_pretrained folder of a video model (VideoMAE, ViViT; TimeSformer refused)
    "tome_deploy.models.hf_transformers",  # hf:<id>, a save_pretrained folder (a directory with config.json)
    "tome_deploy.models.loading.timm_source",  # timm model names, checkpoint and pickled-module files: the fallback
)


def source_forms() -> list[SourceForm]:
    """Every registered source form, in the order they are tried."""
    return [importlib.import_module(name).SOURCE_FORM for name in SOURCE_FORM_MODULES]


def load_model(source: ModelSource | str, **options) -> LoadedModel:
    """Load `source` (a ModelSource, or a name/path with ModelSource's fields as keywords) as a supported
    model in eval mode, through the first source form that claims it.

    Raises ModelLoadError / UnsafePickleError (cannot or may not be loaded), UnsupportedModelError (not a
    model ToMe can rewrite) or InvalidInputError (bad img_size or conflicting arguments).
    """
    if not isinstance(source, ModelSource):
        source = ModelSource(source, **options)
    elif options:
        raise TypeError("pass a ModelSource or keyword options, not both")
    loaded = claiming_form(source).load(source)
    loaded.model.eval()
    return loaded


def claiming_form(source: ModelSource) -> SourceForm:
    """The first source form that claims `source` (timm, the last, claims every source)."""
    for form in source_forms():
        if form.claims(source):
            return form
    raise AssertionError(
        f"no source form claims {source.name}; the last of SOURCE_FORM_MODULES must claim every source"
    )

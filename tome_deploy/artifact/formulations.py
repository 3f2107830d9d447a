"""Merge formulations as registered objects: one `MergeFormulation` per way of summing merged tokens.

A formulation says everything the package needs to know about it: its name (what `--merge` and the
metadata's `tome.merge` say), a one-line description, the targets and runtimes it supports and why it
is refused elsewhere, how it sums token rows eagerly and while traced, an optional fused weighted merge,
the translations the ONNX exporter needs for its custom ops, and what a runtime must do before it loads
one of its graphs. Every caller asks the object; no module outside the formulation modules branches on a
formulation's name (tests/artifact/test_formulations.py scans the package for it).

Imports no torch. The built-in formulations live in the layers that implement them
(`core/formulations.py`: scatter, matmul; `token_merge/formulation.py`: plugin); those modules import
torch only inside their functions, and this registry imports them by module path on first use, as
models/adapter.py does for model families, so `tome-export --help` and torch-free artifact readers know
every name. Anything else (a test, a user) calls `register`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from tome_deploy.artifact.spec import TARGET_DEFAULT_MERGE, TARGETS
from tome_deploy.errors import InvalidInputError

# row_adder(destination [B, r, 1] int64 rows, num_rows M) -> add(x [B, M, C], src [B, r, C]) -> [B, M, C],
# each src row summed into its destination row; built once per Match and shared by every tensor merged with it.
RowAdder = Callable[[Any, int], Callable[[Any, Any], Any]]
# fused_merge(x [B, N, C], size [B, N, 1] fp32, match: core.merge.Match) -> (x [B, N - r, C], size [B, N - r, 1]).
FusedMerge = Callable[[Any, Any, Any], tuple[Any, Any]]

# Modules whose FORMULATIONS tuple holds built-in formulations, registered in this order on first use.
_FORMULATION_MODULES = (
    "tome_deploy.core.formulations",
    "tome_deploy.token_merge.formulation",
)


def _no_translations() -> dict:
    return {}


@dataclass(frozen=True, eq=False)
class MergeFormulation:
    """One merge formulation. Equal only to itself; a copy or an unpickled one is the registered object.

    targets: the `--target` values whose exports may use it; runtimes: those that run its graphs (onnxruntime,
    openvino, tensorrt). refusals: a target or runtime it does not support -> why, as a clause ("OpenVINO has
    no tome::TokenMerge op"). row_adder: the sum of source rows into destination rows (plain sums such as
    source tracking, and the size-weighted merge unless fused_merge is set). custom_op: the non-standard ONNX
    op ("domain::Type") its graphs hold, if any. onnx_translations: {torch op overload: onnxscript
    translation} the exporter adds for the ops it traces to. runtime_hooks: runtime -> what must run
    before that runtime loads one of its graphs (registering custom_op, or failing with what to install).
    """

    name: str
    description: str
    targets: tuple[str, ...]
    runtimes: tuple[str, ...]
    row_adder: RowAdder
    refusals: Mapping[str, str] = field(default_factory=dict)
    fused_merge: Optional[FusedMerge] = None
    custom_op: Optional[str] = None
    onnx_translations: Callable[[], dict] = _no_translations
    runtime_hooks: Mapping[str, Callable[[], object]] = field(default_factory=dict)

    def __reduce__(self):
        return formulation_named, (self.name,)

    @property
    def needs_custom_op(self) -> bool:
        """Whether its graphs hold an op no runtime knows until the runtime hook registers it."""
        return self.custom_op is not None

    def supports_target(self, target: str) -> bool:
        return target in self.targets

    def supports_runtime(self, runtime: str) -> bool:
        return runtime in self.runtimes

    def why_not(self, place: str) -> str:
        """Why this formulation cannot run on `place` (a target or a runtime), as a clause."""
        return self.refusals.get(place, f"it does not support {place}")

    def check_runtime(self, runtime: str) -> None:
        """Raise InvalidInputError, naming the formulations that can, unless `runtime` runs its graphs."""
        if not self.supports_runtime(runtime):
            others = [f.name for f in all_formulations() if f.supports_runtime(runtime)]
            raise InvalidInputError(
                f"{self.why_not(runtime)}, so --merge {self.name} cannot run in it; "
                f"use --merge {either(others)} with --runtime {runtime}"
            )

    def prepare_runtime(self, runtime: str) -> None:
        """Run what `runtime` needs before it loads one of this formulation's graphs (nothing for most)."""
        hook = self.runtime_hooks.get(runtime)
        if hook is not None:
            hook()


_registry: dict[str, MergeFormulation] = {}
_builtins_loaded = False


def _formulations() -> dict[str, MergeFormulation]:
    """The registry, with the built-in formulations registered on first use."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _FORMULATION_MODULES:
            for formulation in importlib.import_module(module).FORMULATIONS:
                register(formulation)
    return _registry


def register(formulation: MergeFormulation) -> MergeFormulation:
    """Make `formulation` known by its name to apply_tome, the exporter, tome-export and metadata readers."""
    registry = _formulations()
    if formulation.name in registry:
        raise InvalidInputError(
            f"a merge formulation named {formulation.name!r} is already registered; pick another name"
        )
    registry[formulation.name] = formulation
    return formulation


def unregister(name: str) -> None:
    """Forget the formulation `name` (it was registered with `register`)."""
    formulation_named(name)
    del _registry[name]


def all_formulations() -> tuple[MergeFormulation, ...]:
    """Every registered formulation, the built-in ones first."""
    return tuple(_formulations().values())


def formulation_names() -> tuple[str, ...]:
    return tuple(_formulations())


def formulation_named(name: str) -> MergeFormulation:
    """The registered formulation `name`; InvalidInputError naming the choices when there is none."""
    registry = _formulations()
    if name not in registry:
        raise InvalidInputError(f"unknown merge formulation {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


def get_formulation(formulation: MergeFormulation | str) -> MergeFormulation:
    """`formulation` itself, or the registered one of that name."""
    return formulation if isinstance(formulation, MergeFormulation) else formulation_named(formulation)


def merge_for_target(merge: MergeFormulation | str | None, target: str) -> MergeFormulation:
    """The merge formulation an export for `target` uses; refuses one that `target` cannot run."""
    if target not in TARGETS:
        raise InvalidInputError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    default = TARGET_DEFAULT_MERGE[target]
    if merge is None:
        return formulation_named(default)
    formulation = get_formulation(merge)
    if not formulation.supports_target(target):
        others = [f.name for f in all_formulations() if f.supports_target(target)]
        raise InvalidInputError(
            f"--merge {formulation.name} cannot run on {target}: {formulation.why_not(target)}; "
            f"drop --merge (--target {target} picks {default}) or pass --merge {either(others)}"
        )
    return formulation


def either(names: Iterable[str]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    names = list(names)
    return " or ".join(names) if len(names) <= 2 else f"{', '.join(names[:-1])} or {names[-1]}"

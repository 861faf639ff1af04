"""Which modules a recorder hooks. By default every LayerNorm- and RMSNorm-like module, found by
class name through its bases (torch's `LayerNorm`/`RMSNorm`, transformers' `LlamaRMSNorm`,
`T5LayerNorm`, a hand-written `BertLayerNorm`, a subclass of any of them), since fine-tuned
models write their own norms more often than they use torch's."""

import fnmatch
from typing import TYPE_CHECKING

from ticknorm.base.errors import TicksError

if TYPE_CHECKING:
    from torch import nn

NORM_NAMES = ("LayerNorm", "RMSNorm", "RmsNorm")


def is_norm(module) -> bool:
    return any(name in cls.__name__ for cls in type(module).__mro__ for name in NORM_NAMES)


def chosen_modules(model: "nn.Module", modules=None) -> list[tuple[str, "nn.Module"]]:
    """(path, module) of what `modules` names: None for the norms, a glob on module paths, or a
    module class or tuple of classes."""
    named = list(model.named_modules())
    if modules is None:
        chosen, wanted = [(path, m) for path, m in named if is_norm(m)], "LayerNorm- or RMSNorm-like module"
    elif isinstance(modules, str):
        chosen = [(path, m) for path, m in named if fnmatch.fnmatchcase(path, modules)]
        wanted = f"module matching '{modules}'"
    else:
        classes = modules if isinstance(modules, tuple) else (modules,)
        chosen = [(path, m) for path, m in named if isinstance(m, classes)]
        wanted = f"module of type {' or '.join(c.__name__ for c in classes)}"
    if not chosen:
        examples = ", ".join(f"'{path}'" for path, _ in named[1:4]) or "only the root"
        raise TicksError(f"{type(model).__name__} has no {wanted} to record (its modules: {examples}, ...); "
                         "choose them with modules=GLOB or modules=(SomeNorm,)")
    return chosen

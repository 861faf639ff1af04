"""Polygraphy RunResults (`polygraphy run --save-outputs`, a bundle's outputs.json): one runner's
outputs per iteration, read through Polygraphy's own JSON so every file it writes is understood.

A RunResults file holds a list of (runner name, iterations); which runner serves as a reference
is asked for by name, or found: `torch` (what a ticknorm bundle stores), else the only one."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ticknorm.base.errors import InputSpecError
from ticknorm.base.inputs import read_polygraphy_json


def polygraphy_quiet():
    """Polygraphy's logger held silent for the length of a `with`: it logs every file it saves and
    every comparison it makes, which ticknorm reports in its own lines (or refuses in one)."""
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1)


def load_run_results(path):
    """The RunResults a file holds (decoded and type-checked as `RunResults.load` does), or
    InputSpecError naming the file and what is wrong with it."""
    from polygraphy.comparator import RunResults

    path = Path(path)
    results = read_polygraphy_json(path, "reference outputs", "Polygraphy RunResults")
    if not isinstance(results, RunResults):
        raise InputSpecError(f"{path} is not a Polygraphy RunResults file (polygraphy run --save-outputs writes one)")
    return results


def runner_outputs(results, path, runner: str | None = None) -> tuple[str, list]:
    """(runner name, its IterationResults: one name -> array mapping per iteration) of `runner`,
    else of `torch`, else of the only runner the results hold."""
    from polygraphy.comparator import IterationResult

    names = list(results.keys())
    if runner is None:
        runner = "torch" if "torch" in names else names[0] if len(names) == 1 else None
        if runner is None:
            raise InputSpecError(f"{path} holds the results of {len(names)} runners ({', '.join(names) or 'none'}): "
                                 "name the reference with --reference-runner")
    elif runner not in names:
        raise InputSpecError(f"{path} holds no runner '{runner}'; it has {', '.join(names) or 'none'}")
    iterations = results[runner]
    if not isinstance(iterations, list) or not all(isinstance(it, IterationResult) for it in iterations):
        raise InputSpecError(f"{path}: runner '{runner}' holds no iterations of outputs (IterationResults)")
    if not iterations or not all(isinstance(v, np.ndarray) for it in iterations for v in it.values()):
        raise InputSpecError(f"{path}: runner '{runner}' holds no iterations of name -> array outputs")
    return runner, iterations


@dataclass(frozen=True)
class SavedReference:
    """Reference outputs read from a file instead of computed by PyTorch: the runner's
    IterationResults (one name -> array mapping per iteration), the file they came from and the
    runner that made them."""

    outputs: list
    file: str
    runner: str

    @property
    def label(self) -> str:
        return f"{self.file}: {self.runner}"


def read_reference(path, runner: str | None = None) -> SavedReference:
    """`runner`'s outputs in a Polygraphy RunResults file (see `runner_outputs` for the default)."""
    chosen, outputs = runner_outputs(load_run_results(path), path, runner)
    return SavedReference(outputs, Path(path).name, chosen)


def saved_outputs(saved: SavedReference, output_names: list[str], iterations: int) -> list:
    """The saved outputs, checked to hold every graph output for each of `iterations` feeds."""
    if len(saved.outputs) != iterations:
        raise InputSpecError(f"{saved.label} holds {len(saved.outputs)} iteration(s) of outputs for {iterations} of "
                             "inputs: give the inputs it was made from (--input-file, e.g. polygraphy's --save-inputs)")
    held = saved.outputs[0]
    for name in output_names:
        if name not in held:
            raise InputSpecError(f"{saved.label} holds no output '{name}' (it has {', '.join(held) or 'none'})")
    return saved.outputs

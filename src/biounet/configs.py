"""The components' settings: small frozen dataclasses that check their own fields.

Each belongs to one component, which re-exports it (`biounet.augment.AugmentConfig`,
`biounet.data.DataConfig`, `biounet.loop.TrainConfig`, `biounet.inference.Tiling`,
`biounet.predict.PredictConfig`, `biounet.evaluate.EvaluateConfig`). They live together here
because the command line takes its defaults from them before anything heavy (torch, SciPy)
is imported: this module imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from biounet.checks import check_number
from biounet.errors import BiounetError

# MiB of feature maps of one batch of tiles; torch and the model come on top
DEFAULT_MEMORY_MB = 1024


# -- normalisation (biounet.normalize) ----------------------------------------------------

METHODS = ("percentile", "dtype", "none")


@dataclass(frozen=True)
class NormalizeConfig:
    """How raw intensities become network input.

    Parameters
    ----------
    method : {"percentile", "dtype", "none"}
        "percentile": per image and channel, (x - p_low) / (p_high - p_low);
        "dtype": divide by the maximum of the integer dtype (255, 65535); floats unchanged;
        "none": cast to float32 unchanged.
    low, high : float
        Percentiles for "percentile".
    """

    method: str = "percentile"
    low: float = 1.0
    high: float = 99.8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BiounetError(
                f"normalization method must be one of {METHODS}, not {self.method!r}"
            )
        check_number("low", self.low, low=0, high=100)
        check_number("high", self.high, low=0, high=100)
        if not 0.0 <= self.low < self.high <= 100.0:
            raise BiounetError(
                f"need 0 <= low < high <= 100 percentiles, got {self.low}, {self.high}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# -- augmentation (biounet.augment) --------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to draw, and how strong.

    Attributes
    ----------
    elastic : bool
        Smooth elastic deformation (the paper's main augmentation).
    elastic_grid : int
        Control points per axis, spread evenly over the tile, corners included (paper: 3).
    elastic_std : float
        Standard deviation, in pixels, of the Gaussian control-point displacements (paper: 10).
    rotate : bool
        Rotation about the tile centre by an angle uniform in [0, 360) degrees.
    max_shift : float
        Shift of the whole tile, uniform in [-max_shift, max_shift] pixels per axis. Default 0:
        the tile centre is already drawn at random by the training pipeline.
    flip : bool
        Independent vertical and horizontal flips, each with probability 1/2.
    scale_range : tuple of float
        Zoom factor, uniform in ``[lo, hi]``; a factor s > 1 magnifies (the tile covers 1/s of
        the image extent). Default ``(1.0, 1.0)``: no scaling, the paper does not mention any.
    gray : bool
        Gray-value changes in `adjust_gray`.
    gamma_range : tuple of float
        Gamma exponent, log-uniform in the range (applied to the tile's own value range).
    contrast_range : tuple of float
        Contrast factor about the tile mean, uniform in the range.
    brightness_range : tuple of float
        Added offset, uniform in the range; in units of the image values (images are
        normalised to about [0, 1], so +-0.1 is +-10 % of the range).
    """

    elastic: bool = True
    elastic_grid: int = 3
    elastic_std: float = 10.0
    rotate: bool = True
    max_shift: float = 0.0
    flip: bool = True
    scale_range: tuple[float, float] = (1.0, 1.0)
    gray: bool = True
    gamma_range: tuple[float, float] = (0.8, 1.25)
    contrast_range: tuple[float, float] = (0.8, 1.25)
    brightness_range: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self) -> None:
        if self.elastic_grid < 2:
            raise ValueError(f"elastic_grid must be >= 2, got {self.elastic_grid}")
        check_number("elastic_std", self.elastic_std, low=0)
        if not self.max_shift >= 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")
        for name in ("scale_range", "gamma_range", "contrast_range", "brightness_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must satisfy lo <= hi, got {(lo, hi)}")
        for name in ("scale_range", "gamma_range", "contrast_range"):
            if not getattr(self, name)[0] > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """A configuration with every augmentation disabled (plain crops, unchanged values)."""
        return cls(elastic=False, rotate=False, flip=False, gray=False)

    @property
    def is_geometric_identity(self) -> bool:
        """True when `sample_coordinates` always returns the plain crop."""
        return (
            not (self.elastic and self.elastic_std > 0)
            and not self.rotate
            and not self.flip
            and self.max_shift == 0
            and self.scale_range == (1.0, 1.0)
        )


# -- data (biounet.data) -------------------------------------------------------------------


TOUCHING = ("background", "class", "keep")


@dataclass(frozen=True)
class DataConfig:
    """How masks are read and weighted.

    Parameters
    ----------
    mask_type : {"binary", "instances", "classes"} or None
        None detects per mask (<= 2 values: binary, more: instances).
    foreground : int, optional
        Stored value of the foreground in binary masks (default: the larger value).
    class_balance : bool
        Weight pixels by inverse class frequency per image (w_c of the paper's eq. 2).
    border_w0, border_sigma : float
        The paper's border term w0 * exp(-(d1 + d2)^2 / (2 sigma^2)); ``border_w0 = 0`` turns
        it off. It applies to the pixels between cells.
    cell_class : int
        For binary and class masks: the class whose connected components are the cells
        (1 for nuclei on background; 0 for ISBI, where class 1 is the membrane between cells).
        Instance masks give the cells directly.
    touching : {"background", "class", "keep"}
        Instance masks only: where two cells touch, their contact pixels become background
        (the paper's way, for 2-class models), a third "border" class 2 (for 3-class models:
        the network learns the contacts explicitly), or stay cell ("keep").
    augment : AugmentConfig or None
        Elastic deformation, rotation, flips, gray values (None: plain crops).
    """

    mask_type: str | None = None
    foreground: int | None = None
    class_balance: bool = True
    border_w0: float = 10.0
    border_sigma: float = 5.0
    cell_class: int = 1
    touching: str = "background"
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        d = dict(d)
        if d.get("augment") is not None:
            aug = dict(d["augment"])
            for key, value in aug.items():
                if isinstance(value, list):
                    aug[key] = tuple(value)
            d["augment"] = AugmentConfig(**aug)
        return cls(**d)

    def __post_init__(self) -> None:
        if self.touching not in TOUCHING:
            raise BiounetError(f"touching must be one of {TOUCHING}, not {self.touching!r}")
        check_number("border_w0", self.border_w0, low=0)
        check_number("border_sigma", self.border_sigma, low=0, low_open=True)
        check_number("cell_class", self.cell_class, low=0, integer=True)
        check_number("foreground", self.foreground, integer=True, none_ok=True)


# -- optimisation (biounet.loop) ---------------------------------------------------------


LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    The paper trains with SGD, momentum 0.99 and large tiles (``optimizer="sgd"``). The default
    is Adam (lr 1e-3): on ISBI 2012 with the border weight map, SGD at momentum 0.99 diverged at
    lr 1e-2 and 5e-2 and reached a validation loss of 0.63 at lr 1e-3 where Adam reached 0.47
    after 300 steps (base 16, tile 228; commands in docs/benchmarks.md).
    """

    steps: int = 2000
    batch_size: int = 1
    tile: int = 388  # output tile side, snapped down to a valid size
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.99, the paper's)
    lr: float = 0.001
    momentum: float = 0.99
    weight_decay: float = 0.0
    seed: int = 0
    val_every: int = 200
    checkpoint_every: int = 200
    log_every: int = 10
    num_workers: int = 0
    precision: str = "auto"
    max_minutes: float | None = None  # wall-clock budget; training stops at steps or budget
    # "cosine": lr * (1 + cos(pi * progress)) / 2, progress = the larger of the fractions of
    # steps and of the time budget spent, so a wall-clock run also ends at a small lr and its
    # last weights are not a random point of a noisy batch-1 trajectory.
    lr_schedule: str = "constant"
    # Weight of a soft Dice term added to the weighted cross-entropy (0: the paper's loss).
    dice: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise BiounetError(f"optimizer must be sgd or adam, not {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BiounetError(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}"
            )
        for name in ("steps", "batch_size", "tile", "val_every", "checkpoint_every", "log_every"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("num_workers", self.num_workers, low=0, integer=True)
        check_number("seed", self.seed, low=0, high=2**32 - 1, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("max_minutes", self.max_minutes, low=0, low_open=True, none_ok=True)
        try:
            check_number("dice", self.dice, low=0)
        except BiounetError:
            raise BiounetError(
                f"dice weight must be >= 0 (`dice` 0: the paper's loss alone), not {self.dice}"
            ) from None


# -- prediction (biounet.inference, biounet.predict) ----------------------------------------


@dataclass(frozen=True)
class Tiling:
    """How an image is cut into tiles.

    Parameters
    ----------
    tile : int, optional
        Output tile side, snapped down to a valid size. Default: the tile that computes the
        fewest pixels for each image within `memory_mb` (`biounet.tiling.auto_tile`).
    halo : int, optional
        Discarded tile border of the padded ("same") variant (default: exact tiling).
    batch_size : int
        Tiles per forward pass.
    memory_mb : float
        Budget for the feature maps of one batch of tiles when the tile size is automatic.
    """

    tile: int | None = None
    halo: int | None = None
    batch_size: int = 1
    memory_mb: float = DEFAULT_MEMORY_MB

    def __post_init__(self) -> None:
        check_number("tile", self.tile, low=1, integer=True, none_ok=True)
        check_number("halo", self.halo, low=0, integer=True, none_ok=True)
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise BiounetError(f"batch size must be >= 1 (`batch_size`), not {self.batch_size}")
        if not self.memory_mb > 0 or self.memory_mb == float("inf"):
            raise BiounetError(
                f"memory budget must be > 0 MiB and finite (`memory_mb`), not {self.memory_mb}"
            )


OUTPUTS = ("mask", "prob", "instances")
ENGINES = ("auto", "torch", "nnpack", "openvino", "onnxruntime")  # biounet.runtimes


@dataclass(frozen=True)
class PredictConfig:
    """How to predict.

    Parameters
    ----------
    tile, batch_size, halo, memory_mb
        The tiling (`biounet.inference.Tiling`, which `tiling` returns).
    precision : {"auto", "fp32", "bf16", "fp16"}
    output : {"mask", "prob", "instances"}
        "mask": uint8 class indices; "prob": float32 softmax, one plane per class;
        "instances": uint16 labels 1..N (uint32 beyond 65535 objects), post-processed as the
        model's config says (`instance_config`).
    overlay : bool
        Also write ``STEM_overlay.png``: the mask in colour (instances: their contours in
        random colours) over the image.
    tta : bool or None
        Test-time augmentation: average the probabilities over the 8 rotations/flips of the
        image, tile by tile (`biounet.tta`; the paper averaged over rotated versions of the
        input). 8x the compute. None (default): as the model's config stores it
        (``postprocess.tta``), else off.
    stream_pixels : int
        TIFF inputs with more pixels than this, predicted as masks or instances (without
        overlay), are read and written tile by tile (`predict_large`), so memory does not
        grow with the image.
    stream : bool
        Stream every TIFF input, whatever its size (masks and instances only).
    skip_existing : bool
        Leave out inputs all of whose outputs exist (a run that was killed continues).
    instance_margin : int
        Context (px) read around each block when streamed instances are labelled block by
        block: the widest clump of touching cells must fit in it (wider ones are logged).
        Masks of a model with a stored membrane post-processing are made block by block with
        the same context: the cells beside a block must fit in it.
    blockwise : bool
        Predict every input block by block into a zarr output (``STEM.zarr``), as zarr
        inputs always are (`biounet.predict_zarr`): what a cluster run does.
    engine : {"auto", "torch", "nnpack", "openvino", "onnxruntime"}
        What runs the network (`biounet.runtimes.choose`): "auto" the fastest installed one
        for the device, CPU class, precision and network width.
    cache : str, optional
        Folder for the runtimes' converted graphs (default ``~/.cache/biounet``).
    """

    tile: int | None = None
    batch_size: int = 1
    precision: str = "auto"
    output: str = "mask"
    overlay: bool = False
    halo: int | None = None
    tta: bool | None = None  # None: the model's stored choice (postprocess.tta), else off
    stream_pixels: int = 16 * 2**20  # TIFF inputs larger than this stream tile by tile
    stream: bool = False  # stream masks and instances of TIFFs of any size
    skip_existing: bool = False  # leave out inputs whose outputs are all there
    memory_mb: float = DEFAULT_MEMORY_MB
    instance_margin: int = 128
    blockwise: bool = False
    engine: str = "auto"
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise BiounetError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.output not in OUTPUTS:
            raise BiounetError(f"output must be one of {OUTPUTS}, not {self.output!r}")
        Tiling(self.tile, self.halo, self.batch_size, self.memory_mb)  # its own checks
        if self.stream and (self.output == "prob" or self.overlay):
            raise BiounetError(
                "`stream` writes masks or instances only: drop `output` prob and `overlay`, "
                "or drop `stream`"
            )
        if self.tta is not None and not isinstance(self.tta, bool):
            raise BiounetError(f"`tta` must be true, false or None, not {self.tta!r}")
        check_number("instance_margin", self.instance_margin, low=1, integer=True)
        check_number("stream_pixels", self.stream_pixels, low=0, integer=True)

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.tile, self.halo, self.batch_size, self.memory_mb)


# -- evaluation (biounet.evaluate) -----------------------------------------------------------

TASKS = ("membranes", "semantic", "instances")


@dataclass(frozen=True)
class EvaluateConfig:
    """What to score and how to read the files (see `biounet.evaluate`).

    Attributes
    ----------
    task : {"membranes", "semantic", "instances"}
    num_classes : int, optional
        semantic: number of classes K; default max label + 1 over truth and predictions.
    truth_foreground : int, optional
        membranes: the stored truth value that means membrane; default 0 (ISBI 2012: 0 =
        membrane, 255 = cell). semantic: the stored value of class 1 in a binary truth;
        default the larger value. Unused for instances.
    membrane_class : int
        membranes: class index (mask) or probability plane (probabilities) of membrane in
        the predictions; biounet predicts 0 = interior, 1 = membrane.
    """

    task: str
    num_classes: int | None = None
    truth_foreground: int | None = None
    membrane_class: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BiounetError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise BiounetError(f"number of classes must be at least 1, not {self.num_classes}")
        if self.membrane_class < 0:
            raise BiounetError(f"membrane class must be >= 0, not {self.membrane_class}")

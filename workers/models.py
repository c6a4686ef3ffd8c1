"""Plain `nn.Module` classifiers. They know nothing of Ray, DeepSpeed or distribution.

Every model keeps its dropout layers as `nn.Dropout` modules so the advisor can change their
probability live, and names its layers so parameter groups read well in prompts and ledgers.
Activations are modules too (`make_activation`, chosen by `model.activation`), so an adaptive one
can be switched per layer at an epoch boundary (`AdaptiveActivation`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orchestration.protocol import ACTIVATIONS
from workers.config import ACTIVATION_CHOICES, ModelConfig

# Initial coefficients of the rational activation, P of degree 5 over Q of degree 4 (the Pade Activation
# Unit's default). Fitted once, offline, by least squares of P/Q against leaky ReLU (slope 0.01) on 6001
# evenly spaced points of [-3, 3] in float64 (a linearised least-squares start, then L-BFGS on the
# true squared error), as the PAU paper does; the result agrees with the paper's published init to ~3
# decimals. Max error on [-3, 3]: 0.030 against leaky ReLU, 0.042 against ReLU. A (3, 2) fit was
# rejected: its max error against ReLU is 0.115. Outside the fit range P/Q tends to the line
# `0.72 x` on both sides (f(-10) = -2.7): a layer without batch norm that feeds it large negative
# inputs sees a leaky, not a flat, negative side.
RATIONAL_NUMERATOR_INIT = (0.029797, 0.618376, 2.322952, 3.050984, 1.484722, 0.250867)  # a_0 .. a_5
RATIONAL_DENOMINATOR_INIT = (1.141801, 4.391749, 0.871088, 0.346973)  # b_1 .. b_4
PRELU_INIT = 0.25  # He et al. (2015)


class RationalActivation(nn.Module):
    """A learnable rational activation ("safe" Pade Activation Unit, Molina et al., 2020):

        f(x) = P(x) / Q(x),   P(x) = a_0 + a_1 x + ... + a_5 x^5,
                              Q(x) = 1 + |b_1| |x| + |b_2| |x|^2 + ... + |b_4| |x|^4  >= 1,

    so the denominator never vanishes. One set of coefficients per layer (shared by its channels, as
    in PAU), initialised to approximate leaky ReLU on [-3, 3] (`RATIONAL_NUMERATOR_INIT`). Works on
    any shape. Computed in float32 at least, so bf16 coefficients and inputs keep the fit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(RATIONAL_NUMERATOR_INIT))
        self.denominator = nn.Parameter(torch.tensor(RATIONAL_DENOMINATOR_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        z, a, b = x.to(dtype), self.numerator.to(dtype), self.denominator.to(dtype).abs()
        numerator = a[-1]
        for coefficient in a.flip(0)[1:]:  # Horner: a_0 + x (a_1 + x (a_2 + ...))
            numerator = numerator * z + coefficient
        magnitude = z.abs()
        denominator = b[-1]
        for coefficient in b.flip(0)[1:]:
            denominator = denominator * magnitude + coefficient
        return (numerator / (1.0 + denominator * magnitude)).to(x.dtype)


class AdaptiveActivation(nn.Module):
    """An activation the advisor may switch between the kinds of `ACTIVATIONS` (relu, prelu, rational).

    It holds every kind's parameters from the start (a per-channel PReLU slope at 0.25, the rational
    coefficients), so switching adds no parameter: DeepSpeed's optimizer and its flat buffers never
    change. The active kind is the integer buffer `choice` (an index into `ACTIVATIONS`), so a
    checkpoint saves it with the module's other buffers and a rollback that reloads module state
    restores it. Inactive kinds' parameters get no gradient and keep their values, so switching back
    gives the same function as before. Inputs are (N, C, ...) or (N, C) with C = `channels`.

    Saved runs store the index, so `ACTIVATIONS` may only grow at its end, never be reordered.
    """

    def __init__(self, channels: int, kind: str = "relu"):
        super().__init__()
        self.prelu = nn.PReLU(channels, init=PRELU_INIT)
        self.rational = RationalActivation()
        self.register_buffer("choice", torch.tensor(_activation_index(kind)))
        # The forward pass dispatches on the buffer's value. Reading it from a GPU is a host sync, and
        # a tracer (torch.export, hence the ONNX export) cannot branch on it, so the value is mirrored
        # in `_index`: re-read when the buffer is replaced or written in place (every in-place write
        # bumps its version counter) and refreshed by `load_state_dict`; a trace uses the mirror.
        self._index = int(self.choice)
        self._seen: tuple[torch.Tensor, int] = (self.choice, self.choice._version)

    @property
    def kind(self) -> str:
        return ACTIVATIONS[self._active_index()]

    def set_kind(self, kind: str) -> str:
        """Make `kind` (one of `ACTIVATIONS`) the active activation; returns the previous kind."""
        index, previous = _activation_index(kind), self.kind
        with torch.no_grad():
            self.choice.fill_(index)
        self._refresh()
        return previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "relu":
            return torch.relu(x)
        if kind == "prelu":
            return self.prelu(x)
        return self.rational(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, channels={self.prelu.num_parameters}"

    def _active_index(self) -> int:
        if not torch.compiler.is_compiling():
            choice, (seen, version) = self.choice, self._seen
            if choice is not seen or choice._version != version:
                self._refresh()
        return self._index

    def _refresh(self) -> None:
        index = int(self.choice)
        if not 0 <= index < len(ACTIVATIONS):
            raise ValueError(f"activation choice buffer holds {index}, not an index into {ACTIVATIONS}")
        self._index, self._seen = index, (self.choice, self.choice._version)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._refresh()  # a model loaded and then exported (predict, ONNX) never ran an eager forward


def _activation_index(kind: str) -> int:
    if kind not in ACTIVATIONS:
        raise ValueError(f"an adaptive activation's kind must be one of {ACTIVATIONS}, got {kind!r}")
    return ACTIVATIONS.index(kind)


def make_activation(kind: str, channels: int) -> nn.Module:
    """The activation module for `model.activation` = `kind`, after a layer with `channels` outputs.

    relu -> `nn.ReLU` (parameter-free, so relu models keep their state_dict keys); prelu -> `nn.PReLU`
    with one slope per channel at 0.25; rational -> `RationalActivation`; adaptive ->
    `AdaptiveActivation` starting as ReLU.
    """
    if kind == "relu":
        return nn.ReLU()
    if kind == "prelu":
        return nn.PReLU(channels, init=PRELU_INIT)
    if kind == "rational":
        return RationalActivation()
    if kind == "adaptive":
        return AdaptiveActivation(channels)
    raise ValueError(f"model.activation must be one of {ACTIVATION_CHOICES}, got {kind!r}")


class CNN2d(nn.Module):
    """Conv stages (conv-activation, doubling channels, pooling after the second) then a 2-layer classifier."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 2, hidden: int = 128, dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(depth):
            out = width * 2**stage
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), make_activation(activation, out)]
            if stage % 2 == 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # fixed 4x4 map whatever the input size
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 16, hidden), make_activation(activation, hidden), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class CNN1d(nn.Module):
    """1-D conv stages over a sequence (N, C, L) or a feature vector treated as one channel."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 2, hidden: int = 128, dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(depth):
            out = width * 2**stage
            layers += [nn.Conv1d(channels, out, kernel_size=5, padding=2), make_activation(activation, out)]
            if stage % 2 == 1:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(8)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 8, hidden), make_activation(activation, hidden), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.pool(self.features(x)))


class MLP(nn.Module):
    """Fully connected layers with an activation and dropout, for tabular data (N, F)."""

    def __init__(self, in_features: int, num_classes: int, *, width: int = 256, depth: int = 2, dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), make_activation(activation, width), nn.Dropout(dropout)]
            features = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act2 = make_activation(activation, out_channels)  # after the sum with the shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: a stem, two stages of `depth` basic blocks (the second strided), global pooling."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 1, dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), make_activation(activation, width))
        blocks: list[nn.Module] = []
        channels = width
        for stage, out in enumerate((width, width * 2)):
            for index in range(depth):
                blocks.append(BasicBlock(channels, out, stride=2 if stage > 0 and index == 0 else 1, activation=activation))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resolve_kind(kind: str, sample_shape: tuple[int, ...]) -> str:
    """The model kind for one sample's shape (without the batch dim) when `kind` is `auto`."""
    if kind != "auto":
        return kind
    return "cnn2d" if len(sample_shape) == 3 else "mlp"


def build_model(config: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured model for samples of `sample_shape` ((C, H, W) images or (F,) features)."""
    if config.factory is not None:
        return build_from_factory(config, sample_shape, num_classes)
    kind = resolve_kind(config.kind, sample_shape)
    config = config.for_kind(kind)
    if kind in ("cnn2d", "resnet") and len(sample_shape) != 3:
        raise ValueError(f"model.kind={kind!r} needs image samples (C, H, W), got sample shape {sample_shape}")
    if kind == "cnn2d":
        model: nn.Module = CNN2d(sample_shape[0], num_classes, width=config.width, depth=config.depth, hidden=config.hidden, dropout=config.dropout,
                                 activation=config.activation)
    elif kind == "resnet":
        model = ResNetSmall(sample_shape[0], num_classes, width=config.width, depth=config.depth, dropout=config.dropout, activation=config.activation)
    elif kind == "cnn1d":
        in_channels = sample_shape[0] if len(sample_shape) == 2 else 1
        model = CNN1d(in_channels, num_classes, width=config.width, depth=config.depth, hidden=config.hidden, dropout=config.dropout,
                      activation=config.activation)
    else:
        model = MLP(math.prod(sample_shape), num_classes, width=config.width, depth=config.depth, dropout=config.dropout, activation=config.activation)
    initialize_weights(model, config.init)
    return model


def build_from_factory(config: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`model.factory(sample_shape, num_classes, **model.options)`, checked to be a module with parameters."""
    from orchestration.errors import ConfigError
    from workers.references import import_reference

    factory = import_reference(config.factory, "model.factory")
    call = f"model.factory {config.factory!r} called with sample_shape={tuple(sample_shape)}, num_classes={num_classes}, options={config.options}"
    try:
        model = factory(tuple(sample_shape), num_classes, **config.options)
    except Exception as error:
        raise ConfigError(f"{call} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{call} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError(f"{call} returned a {type(model).__name__} with no trainable parameters")
    if config.dropout is not None:
        set_dropout(model, config.dropout)
    initialize_weights(model, config.init)
    return model


def check_model(config: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, int]:
    """Build the model once and run two zero samples through it, so a bad factory or a model whose output is
    not (batch, num_classes) logits fails on the driver, before any worker starts. Returns its sizes."""
    from orchestration.errors import ConfigError

    model = build_model(config, sample_shape, num_classes)
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *sample_shape))
    except Exception as error:
        raise ConfigError(f"model ({config.factory or config.kind}) fails on a batch of 2 samples of shape {tuple(sample_shape)}: "
                          f"{type(error).__name__}: {error}") from error
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"model ({config.factory or config.kind}) must return logits of shape (batch, {num_classes}) for "
                          f"{num_classes} classes; a batch of 2 gave {got}")
    return {"parameters": sum(parameter.numel() for parameter in model.parameters())}


def first_dropout(model: nn.Module) -> float:
    """The probability of the model's first dropout layer (0.0 without one): a factory model's configured dropout."""
    return next((float(module.p) for module in model.modules() if isinstance(module, nn.Dropout)), 0.0)


def initialize_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv/linear weights (biases to zero) unless `scheme` is PyTorch's `default`."""
    if scheme == "default":
        return
    for module in model.modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            continue
        if scheme == "zero":
            nn.init.zeros_(module.weight)
        elif scheme == "normal":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:
            raise ValueError(f"model.init must be one of default, zero, normal, xavier, kaiming, got {scheme!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def set_dropout(model: nn.Module, probability: float) -> int:
    """Set every dropout module's probability; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
            changed += 1
    return changed


def adaptive_activations(model: nn.Module) -> dict[str, AdaptiveActivation]:
    """The model's switchable activations by module name (e.g. `features.1`, `blocks.0.act2`), in
    forward order (the models register their modules in the order they run)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptiveActivation)}


def activation_kinds(model: nn.Module) -> dict[str, str]:
    """Every activation module's name and current kind (an adaptive one's active kind), in forward order."""
    kinds: dict[str, str] = {}
    adaptive_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in adaptive_prefixes):
            continue  # the PReLU and rational held inside an adaptive activation
        if isinstance(module, AdaptiveActivation):
            kinds[name] = module.kind
            adaptive_prefixes.append(name + ".")
        elif isinstance(module, nn.ReLU):
            kinds[name] = "relu"
        elif isinstance(module, nn.PReLU):
            kinds[name] = "prelu"
        elif isinstance(module, RationalActivation):
            kinds[name] = "rational"
    return kinds


def inactive_activation_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters of the kinds adaptive activations hold but do not use now.

    They get no gradient from the loss, but under DeepSpeed they sit in the flat buffers with a zero
    gradient, so weight decay and leftover optimizer moments still move them: the caller may reset
    their moments on a switch, keep them out of weight decay, or leave them out of the snapshot."""
    names: list[str] = []
    for module_name, module in adaptive_activations(model).items():
        for kind, branch in module.named_children():  # children are named for their kinds
            if kind != module.kind:
                names += [f"{module_name}.{kind}.{name}" for name, _ in branch.named_parameters()]
    return names

"""Model loading: timm names, local checkpoints, and the embedded default."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from spaces.model_spec import ModelSpec

DEFAULT_MODEL = "tokensched_vit_shapes"  # the embedded default (search/embedded/)
RANDOM_INIT_SEED = 0  # a model without weights is initialised from this seed in every process


def _register_embedded() -> None:
    """Importing search.embedded registers the embedded default with timm."""
    try:
        import search.embedded  # noqa: F401
    except ImportError:  # pragma: no cover - the embedded default ships with the package
        pass


def create(name: str, *, pretrained: bool = False, device: str | torch.device = "cpu", **kwargs) -> nn.Module:
    """timm.create_model with one-line ValueErrors for unknown names and unreachable weights.

    Without pretrained weights the initialisation is drawn from RANDOM_INIT_SEED on the CPU,
    whatever the caller's random state: every Ray worker then holds the same model as the
    process that computed the unreduced logits (a random model is still worth timing)."""
    import timm

    _register_embedded()
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r} (not in timm's registry)")
    if pretrained and not _hub_reachable():
        _hub_offline()  # cached weights still load; nothing waits on retries
    try:
        if pretrained or torch.device(device).type == "meta":
            with torch.device(device):
                return timm.create_model(name, pretrained=pretrained, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            with torch.device("cpu"):
                return timm.create_model(name, pretrained=False, **kwargs).to(device)
    except (OSError, RuntimeError) as err:  # hub download failures (no network, no such file)
        if not pretrained:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load pretrained weights for {name} (offline? use --checkpoint PATH): {first}") from None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_offline() -> None:
    """Make huggingface_hub use its local cache only (as HF_HUB_OFFLINE=1 would at start-up)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return
    constants.HF_HUB_OFFLINE = True


def model_spec(name: str) -> ModelSpec:
    """The shape of a timm model, built on the meta device: no weights, no memory, no network.
    A model the reducers cannot run or the cost model cannot price is a one-line ValueError."""
    from reducers.patch import check_supported

    model = create(name, device="meta")
    check_supported(model)
    return ModelSpec.from_model(model, name=name)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pth/.pt (unwrapping 'model' / 'state_dict' / 'model_ema')."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly; shape or key mismatches are a one-line ValueError."""
    state = read_checkpoint(path)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise ValueError(f"checkpoint {path} does not fit the model: {len(wrong)} tensor(s) differ in shape, "
                         f"e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: {len(missing)} missing key(s) "
                         f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}")
    model.load_state_dict(state)


def load_model(name: str | None = None, *, pretrained: bool = False, checkpoint: str | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """The model to evaluate, in eval mode: the embedded default when no name is given."""
    if name is None:
        name, pretrained = DEFAULT_MODEL, checkpoint is None
    num_classes = None
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        head = state.get("head.weight")
        num_classes = int(head.shape[0]) if head is not None else None
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    model = create(name, pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def data_config(model: nn.Module) -> dict:
    """timm's data config (input size, interpolation, crop, mean, std) for this model."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # a model built with img_size=... differs from its pretrained_cfg
        config["input_size"] = (config["input_size"][0], *img_size)
    return config

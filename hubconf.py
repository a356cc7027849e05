"""torch.hub entry points: one per registered model.

    model = torch.hub.load("<owner>/scalr-zoo", "waffleiron_dinov2_L")
    features = model.extract(points)

Entry names are the registry names with ``-`` turned into ``_``; keyword
arguments go to :func:`scalr_zoo.load` (``device=``, ``sensor=``...).
``pretrained=False`` builds the architecture with random weights.
"""

from typing import Any, Callable

dependencies = ["torch", "numpy", "scipy", "safetensors", "huggingface_hub"]

import scalr_zoo  # noqa: E402  (torch.hub reads `dependencies` first)


def _entry_point(name: str) -> Callable[..., Any]:
    def entry(pretrained: bool = True, **kwargs: Any) -> scalr_zoo.WaffleIron:
        if pretrained:
            return scalr_zoo.load(name, **kwargs)
        device = kwargs.pop("device", None)
        model = scalr_zoo.create_model(scalr_zoo.model_info(name).model_config(), **kwargs)
        return model.to(device) if device is not None else model

    entry.__name__ = name.replace("-", "_")
    entry.__doc__ = f"{name}: {scalr_zoo.model_info(name).description}"
    return entry


for _name in scalr_zoo.list_models():
    globals()[_name.replace("-", "_")] = _entry_point(_name)

"""Faithfulness to a changed model: an honest method explains whatever model it is given.

A map that ignores the model (|x|, an edge detector, a class template, a blend mostly made of
them, a method that notices it is being tested) can score well in perturbation on the trained
model, because the trained model reads large, steep deflections. It cannot follow a change of
model. So each method is also run on copies of the package with the output layer randomised
and, as a second step, the whole top block (the output layer and the block below it), a few
weight draws each; its own maps on each copy are scored by perturbation on that copy's own
logits, paired with the random control's on the same ECGs and replacements. The check passes
when the lower end of the interval (ECGs and draws resampled together) is above the margin on
every copy and under every replacement strategy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ecgx.core.package_reader import ModelPackage
from ecgx.validation.randomisation import parameterised_layers, randomised_weights

# The changed copies, in the order they are judged.
CHANGED_MODELS = ("output_layer", "top_block")
# Weight draws of the changed copies start here, apart from the randomisation check's (0, 1, ...)
# and the "other model" reference's, so the copies are models neither check has seen.
FIRST_DRAW = 2_000_003


def block_of(layer: str) -> str:
    """The block a layer belongs to: the first two parts of its module path
    (``features.7.0`` -> ``features.7``; ``blocks.2.conv1`` -> ``blocks.2``)."""
    return ".".join(layer.split(".")[:2])


def top_block(package: ModelPackage) -> list[str]:
    """The output layer and every parameterised layer of the block just below it."""
    names = [layer["name"] for layer in parameterised_layers(package)]
    if len(names) < 2:
        return names
    below = block_of(names[1])
    return [names[0], *[n for n in names[1:] if block_of(n) == below]]


def changed_models(
    package: ModelPackage, seed: int, draws: int
) -> Iterator[tuple[tuple, dict[str, np.ndarray]]]:
    """Every changed copy as ((model, draw), overrides): per draw, the output layer randomised,
    then the top block (:func:`top_block`), at each tensor's trained scale."""
    layers = parameterised_layers(package)
    params = package.read_parameters()
    chosen = {"output_layer": [layers[0]["name"]], "top_block": top_block(package)}
    for draw in range(draws):
        weights = randomised_weights(params, layers, seed, FIRST_DRAW + draw)
        for model in CHANGED_MODELS:
            yield (model, draw), {p: v for n in chosen[model] for p, v in weights[n].items()}

"""Cutting a model into parts at named modules, through its traced graph.

A cut is valid where exactly one value crosses it: everything after the cut reads only the
activation flowing into the named module (a cut inside a residual block would also need the
skip connection's input). The parts share the model's own modules, so training a part trains
the model, and the composed model is the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from mbp_cli.errors import UsageError, suggest


@dataclass(frozen=True)
class Cut:
    """Where a part begins: the module named in the recipe and its place in the graph."""

    name: str
    index: int  # the graph node the new part starts with


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's forward as a graph of module calls (a UsageError where torch.fx cannot
    follow it, e.g. control flow that depends on the input)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many kinds for code it cannot follow
        raise UsageError(f"train.partition: the model cannot be cut: torch.fx cannot trace "
                         f"its forward ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def _crossing(nodes: list[fx.Node], index: int) -> list[fx.Node]:
    """The values made before node `index` and read at or after it (attributes aside: a part
    reads its own)."""
    position = {node: i for i, node in enumerate(nodes)}
    return [n for n in nodes[:index] if n.op != "get_attr"
            and any(position[user] >= index for user in n.users)]


def _first_calls(graph: fx.GraphModule) -> dict[str, int]:
    """For each module name (at every depth), the graph node where it is first called."""
    first: dict[str, int] = {}
    for i, node in enumerate(graph.graph.nodes):
        if node.op != "call_module":
            continue
        parts = str(node.target).split(".")
        for depth in range(1, len(parts) + 1):
            first.setdefault(".".join(parts[:depth]), i)
    return first


def cut_points(graph: fx.GraphModule) -> dict[str, int]:
    """Every module name where a part may begin, with its node (the outermost name where
    several begin at one node)."""
    nodes = list(graph.graph.nodes)
    first_call = next(i for i, n in enumerate(nodes) if n.op not in ("placeholder", "get_attr"))
    points: dict[str, int] = {}
    for name, index in sorted(_first_calls(graph).items(), key=lambda item: item[0].count(".")):
        if index > first_call and index not in points.values() \
                and len(_crossing(nodes, index)) == 1:
            points[name] = index
    return dict(sorted(points.items(), key=lambda item: item[1]))


def find_cuts(graph: fx.GraphModule, at: Sequence[str | int]) -> list[Cut]:
    """The recipe's cut points, checked: valid names, in the order the model runs them."""
    nodes = list(graph.graph.nodes)
    points, called = cut_points(graph), _first_calls(graph)
    listing = f"Valid cut points: {', '.join(points) or 'none'}"
    cuts = []
    for entry in at:
        name = str(entry)
        if name not in called:
            raise UsageError(f"train.partition.at: the model calls no module {name!r}. "
                             f"{listing}{suggest(name, list(points))}")
        index = called[name]  # an inner name of a valid point (layer3.0) cuts there too
        crossing = [n.name for n in _crossing(nodes, index)]
        if index not in points.values():
            why = (f"{len(crossing)} values cross there ({', '.join(crossing)}): a value "
                   "from before it is read after it (inside a residual block, say, or one the "
                   "model also returns)"
                   if len(crossing) > 1 else "the part before it would be empty")
            raise UsageError(f"train.partition.at: the model cannot be cut at {name}: {why}. "
                             + listing)
        cuts.append(Cut(name, index))
    indices = [c.index for c in cuts]
    if indices != sorted(set(indices)):
        raise UsageError(f"train.partition.at: {[c.name for c in cuts]} must name distinct "
                         f"points in the order the model runs them. {listing}")
    return cuts


def split(model: nn.Module, graph: fx.GraphModule, cuts: Sequence[Cut]) -> list[fx.GraphModule]:
    """The parts, in order, sharing the model's modules and parameters: the first takes the
    model's inputs, each later one the activation at its cut, the last gives the output."""
    nodes = list(graph.graph.nodes)
    bounds = [0, *(c.index for c in cuts), len(nodes)]
    parts = []
    for number, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        part = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if start:
            (entering,) = _crossing(nodes, start)
            env[entering] = part.placeholder(f"cut_{number}")

        def value(node: fx.Node, env: dict[fx.Node, fx.Node] = env,
                  part: fx.Graph = part) -> fx.Node:
            if node not in env and node.op == "get_attr":  # a parameter read on this side
                env[node] = part.node_copy(node)
            return env[node]

        for node in nodes[start:stop]:
            if node.op == "get_attr":
                continue  # copied where it is read
            env[node] = part.node_copy(node, value)
        if stop < len(nodes):
            (leaving,) = _crossing(nodes, stop)
            part.output(env[leaving])
        parts.append(fx.GraphModule(model, part, class_name=f"Part{number + 1}"))
    _check_disjoint(parts, cuts)
    return parts


def _check_disjoint(parts: list[fx.GraphModule], cuts: Sequence[Cut]) -> None:
    """A parameter used on both sides of a cut would be trained twice, apart: refuse it."""
    owner: dict[int, int] = {}
    for number, part in enumerate(parts):
        for name, param in part.named_parameters():
            if owner.setdefault(id(param), number) != number:
                raise UsageError(f"train.partition.at: the model uses {name} both before and "
                                 f"after the cut at {cuts[number - 1].name}; the parts would "
                                 "train it apart. Cut elsewhere")

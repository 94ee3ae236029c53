"""A flow's plan: its tree of steps flattened, as stored in the flows bucket under its id.

The tree `chain(A, group(B, C), D)` becomes nodes in pre-order, each with its parent and
children, and leaves (the tasks) in the order they appear:

    node 0 chain [1, 2, 5]      leaf 0 = node 1 (A)
    node 1 step  A              leaf 1 = node 3 (B)
    node 2 group [3, 4]         leaf 2 = node 4 (C)
    node 3 step  B              leaf 3 = node 5 (D)
    node 4 step  C
    node 5 step  D

Leaf i runs as task `<flow id>.<i>`. A leaf enqueued when the flow is enqueued carries no
body in the plan; one enqueued later (after the steps before it) carries its subject and
body, so the worker that starts it needs nothing but the plan. Names only, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

STEP, CHAIN, GROUP = "s", "c", "g"


@dataclass(slots=True)
class Node:
    """One node of a flow's tree: a step (one task), a chain or a group."""

    kind: str
    parent: int
    children: list[int] = field(default_factory=list)
    leaf: int = -1
    """The leaf index of a step; -1 for a chain or a group."""


@dataclass(slots=True)
class Leaf:
    """One task of a flow: where it goes and, if it is enqueued later, what it carries."""

    node: int
    name: str
    queue: str
    subject: str
    body: str | None = None


@dataclass(slots=True)
class Plan:
    """A flow's tree, flattened (see the module docstring)."""

    nodes: list[Node]
    leaves: list[Leaf]
    created: float = 0.0
    """When the flow was enqueued (seconds since the epoch, the producer's clock)."""

    def to_json(self) -> bytes:
        """The plan as stored: compact, since it must fit in one message (`max_payload`).

        Each subject once; a step node as [kind, parent, leaf], a leaf as [subject's
        index, body]: a group of 10,000 tasks of one kind takes about 250 kB.
        """
        subjects = list(dict.fromkeys(x.subject for x in self.leaves))
        index = {subject: i for i, subject in enumerate(subjects)}
        nodes = [[n.kind, n.parent, n.leaf if n.kind == STEP else n.children] for n in self.nodes]
        leaves = [[index[x.subject], x.body] for x in self.leaves]
        plan = {"at": self.created, "subjects": subjects, "nodes": nodes, "leaves": leaves}
        return json.dumps(plan, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        """A stored plan."""
        raw = json.loads(data)
        nodes = [
            Node(k, p, leaf=x) if k == STEP else Node(k, p, children=x) for k, p, x in raw["nodes"]
        ]
        at = {n.leaf: i for i, n in enumerate(nodes) if n.kind == STEP}
        subjects = raw["subjects"]
        leaves = []
        for leaf, (subject, body) in enumerate(raw["leaves"]):
            tokens = subjects[subject].split(".")  # <ns>.tasks.<queue>.<Task>[.<lane>]
            leaves.append(Leaf(at[leaf], tokens[3], tokens[2], subjects[subject], body))
        return cls(nodes, leaves, raw.get("at", 0.0))

    def starts(self, node: int) -> list[int]:
        """The leaves enqueued when `node` starts: a chain's first, a group's every member's."""
        n = self.nodes[node]
        if n.kind == STEP:
            return [n.leaf]
        if n.kind == CHAIN:
            return self.starts(n.children[0])
        return [leaf for child in n.children for leaf in self.starts(child)]

    def finals(self, node: int) -> list[int]:
        """The leaves whose success means `node` is done: a chain's last, a group's every."""
        n = self.nodes[node]
        if n.kind == STEP:
            return [n.leaf]
        if n.kind == CHAIN:
            return self.finals(n.children[-1])
        return [leaf for child in n.children for leaf in self.finals(child)]

    def before(self, leaf: int) -> int | None:
        """The node whose result leaf `leaf` gets: the one before it in the nearest chain
        it is not the first of; None for a leaf nothing comes before."""
        node = self.leaves[leaf].node
        while (parent := self.nodes[node].parent) >= 0:
            siblings = self.nodes[parent].children
            if self.nodes[parent].kind == CHAIN and siblings[0] != node:
                return siblings[siblings.index(node) - 1]
            node = parent
        return None

    def value(self, node: int, results: dict[int, Any]) -> Any:
        """The result of `node` from its leaves' results: a step's own, a chain's last
        step's, a group's list of its members' in member order."""
        n = self.nodes[node]
        if n.kind == STEP:
            return results[n.leaf]
        if n.kind == CHAIN:
            return self.value(n.children[-1], results)
        return [self.value(child, results) for child in n.children]

    def last_step(self, node: int) -> Node | None:
        """The step whose result is `node`'s result, or None if that is a group's list."""
        n = self.nodes[node]
        while n.kind == CHAIN:
            n = self.nodes[n.children[-1]]
        return n if n.kind == STEP else None


def leaf_id(flow_id: str, leaf: int) -> str:
    """The task id of leaf `leaf` of flow `flow_id`."""
    return f"{flow_id}.{leaf}"


def split_leaf_id(task_id: str) -> tuple[str, int] | None:
    """(flow id, leaf) of a flow step's task id, or None if it is not one."""
    flow_id, _, leaf = task_id.rpartition(".")
    return (flow_id, int(leaf)) if flow_id and leaf.isdigit() else None

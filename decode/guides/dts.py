"""Diffusion tree sampling and search (DTS / DTS*; Jain et al., 2025).

The decoding steps of a prompt form a tree: a node is a canvas at a step (the root: everything
masked), an edge one step of the decoder, a leaf a finished generation. Each rollout walks from the
root: at a node it *expands* — draws a new child from the decoder's own step ``p(·|z)`` — while the
node's draws are fewer than ``⌈widen · visits^widen_power⌉`` (progressive widening, and at most
``max_children`` distinct children), else it *selects* an existing child; once past the tree it
keeps expanding, so the rest of the rollout is the decoder's own decoding and every state it passes
is appended to the tree. The leaf's reward is backed up along the path with the soft Bellman rule

    v(n) = α · log Σ_c (n_c / Σ n) · exp(v(c) / α)

where ``n_c`` counts the draws that produced child ``c`` (children are weighted by how they were
drawn from ``p``, never by how often they were selected); ``v(leaf) = r(leaf)``.

* ``mode="sample"`` (DTS) selects ∝ ``n_c · exp(v(c)/α)`` and returns a final descent by the same
  rule: as the draws at every node grow, the descent samples ``q ∝ p·exp(r/α)``.
* ``mode="search"`` (DTS*) selects the child of highest value, backs up the maximum, and returns the
  best leaf found.

Rollouts run ``parallel`` at a time as rows of one batched decode (each round's selections use the
values of the rounds before). Identical canvases reached from one node are one child (discrete
states), with their draws counted.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.decode.blocks import Decoding
from dlm.decode.guides import GUIDES
from dlm.decode.guides.base import GuidedOutput, Values, as_reward, check_alpha, final_text
from dlm.decode.sampling import uniforms

MODES = ("sample", "search")


class Node:
    """A canvas (its generation) at one decoding step, with its draw statistics and soft value."""

    __slots__ = (
        "gen",
        "step_map",
        "logprobs",
        "children",
        "count",
        "draws",
        "visits",
        "value",
        "depth",
        "text",
        "kids",
        "cdf",
    )

    def __init__(self, gen: Tensor | None, step_map: Tensor | None, logprobs: Tensor | None, depth: int):
        self.gen, self.step_map, self.logprobs, self.depth = gen, step_map, logprobs, depth
        self.children: dict[bytes, Node] = {}
        self.count = 0  # draws from the parent that produced this canvas
        self.draws = 0  # children drawn from this node
        self.visits = 0  # rollouts that passed through this node
        self.value: float | None = None
        self.text: Tensor | None = None  # a leaf's generation as text
        self.kids: list[Node] = []  # valued children, as of the last backup
        self.cdf: list[float] = []  # their cumulative selection probabilities (search: the best first)


@GUIDES.register("dts")
@dataclass(frozen=True)
class DTS:
    rollouts: int = 16
    """Rollouts per prompt (the budget; each is one decoding of the remaining steps)."""
    parallel: int = 8
    """Rollouts of a prompt decoded side by side in one batched round."""
    alpha: float = 1.0
    """Temperature of the tilt exp(r/α) (mode=sample)."""
    mode: str = "sample"
    """sample (DTS: targets q) or search (DTS*: the highest reward found)."""
    widen: float = 1.0
    widen_power: float = 0.5
    """A node draws a new child while its draws < ⌈widen · visits^widen_power⌉."""
    max_children: int | None = None
    """At most this many distinct children per node (None: no cap)."""
    max_nfe: int | None = None
    """Stop starting rounds once every prompt spent this many decoder evaluations."""
    samples: int = 1
    """Samples returned per prompt: independent final descents (sample) or the best distinct leaves (search)."""

    def __post_init__(self):
        if self.rollouts < 1 or self.parallel < 1:
            raise ValueError(f"rollouts={self.rollouts} and parallel={self.parallel} must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "sample":
            check_alpha(self.alpha, False, "DTS samples children ∝ exp(v/α)")
        if self.widen <= 0 or not 0 < self.widen_power <= 1:
            raise ValueError(f"widen={self.widen} must be > 0 and widen_power={self.widen_power} in (0, 1]")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be >= 1")
        if self.max_children is not None and self.max_children < 1:
            raise ValueError(f"max_children={self.max_children} must be >= 1 (or None)")

    # --- the tree rule ------------------------------------------------------------------------

    def choose(self, node: Node, u: float) -> Node:
        """A valued child of ``node`` for the uniform ``u``: ∝ n_c·exp(v/α) (sample) or the highest
        value (search)."""
        if self.mode == "search":
            return node.kids[0]
        return node.kids[min(bisect.bisect_right(node.cdf, u), len(node.kids) - 1)]

    def expands(self, node: Node, pending: int) -> bool:
        """Whether the next rollout through ``node`` draws a new child (``pending``: draws already
        decided at this node in the current step)."""
        if not node.kids:
            return True
        limit = max(1, math.ceil(self.widen * node.visits**self.widen_power))
        room = self.max_children is None or len(node.children) < self.max_children
        return node.draws + pending < limit and room

    def backup(self, nodes: list[Node]) -> None:
        """Recompute the values and selection tables of ``nodes`` (non-leaves) deepest first."""
        for node in sorted(set(nodes), key=lambda n: -n.depth):
            kids = [c for c in node.children.values() if c.value is not None]
            if not kids:
                continue
            if self.mode == "search":
                node.kids = sorted(kids, key=lambda c: -c.value)
                node.value = node.kids[0].value
                continue
            scores = [math.log(c.count) + c.value / self.alpha for c in kids]
            top = max(scores)
            weights = [math.exp(x - top) for x in scores]
            total = sum(weights)
            node.value = self.alpha * (top + math.log(total) - math.log(sum(c.count for c in kids)))
            node.kids, node.cdf = kids, list(itertools.accumulate(w / total for w in weights))

    # --- rollouts -----------------------------------------------------------------------------

    def __call__(self, decoder, model, prompt_ids, *, reward, value=None, attention_mask=None, generator=None):
        """``value`` is unused: DTS backs up terminal rewards."""
        reward = as_reward(reward)
        B = prompt_ids.shape[0]
        roots = [Node(None, None, None, 0) for _ in range(B)]
        found: list[dict[bytes, tuple[float, Tensor]]] = [{} for _ in range(B)]  # distinct leaves per prompt
        decode_nfe = torch.zeros(B, dtype=torch.long)
        calls, done, prompt_part, P_out = 0, 0, None, 0
        while done < self.rollouts and (self.max_nfe is None or int(decode_nfe.min()) < self.max_nfe):
            W = min(self.parallel, self.rollouts - done)
            dec, leaves, inner = self._round(decoder, model, prompt_ids, attention_mask, generator, roots, W)
            values = Values(model, reward, None, B, W)
            rows = torch.arange(B * W, device=dec.x.device)
            rewards = values.rewards(dec, rows).cpu()
            out = dec.output()
            text = final_text(out.tokens[:, out.prompt_length :], dec.eos, dec.mask_id, dec.finished).cpu()
            for r, leaf in enumerate(leaves):
                leaf.value, leaf.text = float(rewards[r]), text[r]
                found[r // W][text[r].numpy().tobytes()] = (float(rewards[r]), text[r])
            self.backup(inner)
            decode_nfe += dec.logits.nfe.view(B, W).sum(dim=1).cpu()
            calls += dec.logits.calls
            done += W
            prompt_part, P_out = out.tokens[::W, : out.prompt_length].cpu(), out.prompt_length
        particles, particle_rewards = [], []
        for b, root in enumerate(roots):
            if self.mode == "search":
                top = sorted(found[b].values(), key=lambda vt: -vt[0])[: self.samples]
                top += [top[-1]] * (self.samples - len(top))  # fewer distinct leaves than samples
            else:
                top = [self.descend(root, generator) for _ in range(self.samples)]
            particles.append(torch.stack([torch.cat([prompt_part[b], text]) for _, text in top]))
            particle_rewards.append([value for value, _ in top])
        particles_t = torch.stack(particles).to(prompt_ids.device)
        rewards_t = torch.tensor(particle_rewards, dtype=torch.float64)
        zero = torch.zeros(B, dtype=torch.long)
        log_w = torch.full((B, self.samples), -math.log(self.samples), dtype=torch.float64)
        return GuidedOutput(
            particles_t[:, 0],
            rewards_t[:, 0],
            particles_t,
            rewards_t,
            log_w,
            decode_nfe,
            decode_nfe.clone(),
            zero,
            zero.clone(),
            calls,
            P_out,
        )

    def descend(self, root: Node, generator) -> tuple[float, Tensor]:
        """A final descent from ``root`` by the selection rule: ``(reward, text)`` of the leaf reached."""
        node = root
        while node.kids:
            node = self.choose(node, float(uniforms(1, generator, torch.device("cpu"))))
        return node.value, node.text

    def _round(self, decoder, model, prompt_ids, attention_mask, generator, roots, W):
        """``W`` rollouts of every prompt side by side; returns the decode, each row's leaf and the
        other nodes the rollouts passed (to back up once the leaves are valued)."""
        B = prompt_ids.shape[0]
        dec = Decoding(
            decoder,
            decoder.make_policy(),
            model,
            prompt_ids.repeat_interleave(W, dim=0),
            None if attention_mask is None else attention_mask.repeat_interleave(W, dim=0),
            generator,
        )
        P = dec.prompt_length
        nodes = [roots[r // W] for r in range(B * W)]
        for node in nodes:
            node.visits += 1
        path: list[Node] = list(set(nodes))
        while dec.ready():
            pending: dict[int, int] = {}
            plan: list[Node | None] = []
            u = uniforms(len(nodes), generator, torch.device("cpu")).tolist()
            for node, u_r in zip(nodes, u):
                if self.expands(node, pending.get(id(node), 0)):
                    pending[id(node)] = pending.get(id(node), 0) + 1
                    plan.append(None)
                else:
                    plan.append(self.choose(node, u_r))
            active = torch.tensor([p is None for p in plan], device=dec.x.device)
            dec.advance(active)
            follow = ~active
            if bool(follow.any()):
                kids = [p for p in plan if p is not None]
                dec.load(
                    follow,
                    torch.stack([k.gen for k in kids]).to(dec.x.device),
                    torch.stack([k.step_map for k in kids]).to(dec.x.device),
                    torch.stack([k.logprobs for k in kids]).to(dec.x.device),
                )
            gen, steps, lps = dec.x[:, P:].cpu(), dec.step_map[:, P:].cpu(), dec.logprobs[:, P:].cpu()
            keys = gen.numpy()
            for r, (node, choice) in enumerate(zip(nodes, plan)):
                if choice is None:  # a draw from the decoder's step
                    key = keys[r].tobytes()
                    child = node.children.get(key)
                    if child is None:
                        child = node.children[key] = Node(
                            gen[r].clone(), steps[r].clone(), lps[r].clone(), node.depth + 1
                        )
                    child.count += 1
                    node.draws += 1
                else:
                    child = choice
                child.visits += 1
                nodes[r] = child
                path.append(child)
        leaves = set(nodes)
        return dec, nodes, [n for n in path if n not in leaves]

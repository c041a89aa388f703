"""The tying schedule (docs/method.md, "The schedule"): decide every k steps, apply, reward, learn, record.

The controller knows nothing about optimizers or engines: the trainer hands it a ``regroup``
callback (plain torch or DeepSpeed) and a ``reward_loss`` callback that measures the model's loss
on a fresh random training batch. Both are called identically on every rank.

``reward_delay=True`` rewards the action taken at decision t with the loss measured at decision t+1,
i.e. after k steps of training under the structure it chose, instead of right after the copy (which
only measures the damage a copy does, never what the structure is worth once trained). The
``loss-drop`` reward is always delayed: loss at decision t (before its copies) minus loss at t+1.

With several ranks, rank 0 decides and every other rank follows (``megatie.runtime.distributed.RankSync``):
the reward is the mean of every rank's measurement, the proposal and the policy's state (its Q
network, exploration generator, eps) come from rank 0 by broadcast, and before a decision is
applied, and again after its regroup, the ranks check that they hold the same tie state and the
same weights - a mismatch is one clear error on every rank, never a hang in the next collective.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatie.errors import ConfigError
from megatie.runtime.distributed import RankSync, param_checksum
from megatie.tying.agent import reward_from_loss
from megatie.tying.layers import (
    LayerTying,
    RegroupPlan,
    count_parameters,
    unique_parameters,
)
from megatie.tying.policies import Proposal, TyingPolicy
from megatie.tying.tie_map import identity_state, num_independent


def _merge_regroups(first: dict, second: dict) -> dict:
    """One decision that regrouped twice (ablation v: copy, then untie again) records both."""
    if not first or not second:
        return first or second
    return {**second, "regroup_seconds": first["regroup_seconds"] + second["regroup_seconds"],
            "regroup_transient_bytes": max(first["regroup_transient_bytes"], second["regroup_transient_bytes"])}


class TieController:
    def __init__(self, tying: LayerTying, policy: TyingPolicy, tie_every: int = 15,
                 reward: str = "neg-ppl",
                 regroup: Callable[[RegroupPlan], dict | None] | None = None,
                 reward_loss: Callable[[], float] | None = None, reward_delay: bool = False,
                 last_step: int | None = None, sync: RankSync | None = None,
                 gradient_gram: Callable[[], torch.Tensor] | None = None):
        if tie_every < 1:
            raise ConfigError(f"--tie-every must be a positive number of steps, got {tie_every}")
        reward_from_loss(0.0, reward, previous=0.0)  # validates the name
        if policy.num_blocks != tying.num_blocks:
            raise ConfigError(f"policy built for {policy.num_blocks} blocks, model has {tying.num_blocks}")
        self.tying, self.policy, self.tie_every, self.reward = tying, policy, tie_every, reward
        self.regroup = regroup or (lambda plan: None)
        self.reward_loss = reward_loss
        self.gradient_gram = gradient_gram  # per-block gradient Gram matrix, for policies that split by it
        self.last_step = last_step  # no decision there: its copies would never be trained
        self.sync = sync or RankSync()
        self.reward_delay = reward_delay or reward == "loss-drop"
        # (state, action, next_state, decision index, loss before its copies) awaiting its delayed reward.
        self._pending: tuple | None = None
        self.policy_state = policy.initial_state()  # what the policy believes (differs under replicate-only)
        self.history: list[dict] = []
        self._greedy_seen: set[tuple[int, ...]] = set()

    def bind_regroup(self, regroup: Callable[[RegroupPlan], dict | None]) -> None:
        """The engine's regroup, called at every decision that changes the structure (the engine is built
        after ``setup``, over the trainable tensors the starting structure leaves)."""
        self.regroup = regroup

    def setup(self) -> None:
        """Put the model in the policy's starting structure; call before building the optimizer."""
        self.tying.initialize(self.policy.initial_state(), self.policy.initial_frozen())
        self._follow_main(None, None)  # every rank starts from rank 0's policy (Q network, generator)

    def is_decision_step(self, step: int) -> bool:
        """``step`` = optimizer steps completed; the first decision comes after k steps, none at the last."""
        return (self.policy.decides and step > 0 and step % self.tie_every == 0
                and (self.last_step is None or step < self.last_step))

    def maybe_decide(self, step: int) -> dict | None:
        return self.decide(step) if self.is_decision_step(step) else None

    def decide(self, step: int) -> dict:
        state = list(self.policy_state)
        old_physical = list(self.tying.state)
        index = len(self.history)
        learns = self.policy.learns
        delayed = proposal = loss_before = None
        if learns and self.reward_delay and (self._pending is not None or self.reward == "loss-drop"):
            # Measured before this decision's copies: k steps of training under the previous choice.
            loss_before = self._measure()
        if getattr(self.policy, "needs_gradients", False):
            # One probe forward/backward, only while the policy can still act on it (collective: every
            # rank decides alike, from the same state).
            self.policy.gram = self._mean_gram() if self.policy.can_split(state) else None
        if self.sync.is_main:
            if learns and self.reward_delay and self._pending is not None:
                prev_state, prev_action, prev_next, prev_index, prev_loss = self._pending
                r = reward_from_loss(loss_before, self.reward, previous=prev_loss)
                delayed = {"reward": r, "reward_loss": loss_before, "rewarded_decision": prev_index,
                           **self.policy.observe(prev_state, prev_action, r, prev_next)}
            proposal = self.policy.propose(state, index)
        proposal, delayed = self._follow_main(proposal, delayed)
        self.sync.verify(f"the tie state of decision {index}", list(proposal.state))
        plan = self.tying.apply(proposal.state)
        regrouped = self.regroup(plan) or {}
        if not self.policy.ties:
            # Ablation (v): the copies happened; every block now trains on its own again.
            untie = self.tying.apply(identity_state(self.tying.num_blocks))
            regrouped = _merge_regroups(regrouped, self.regroup(untie) or {})
        self._verify_ranks(index)
        record = {
            "event": "decision",
            "step": step,
            "decision": index,
            "action": proposal.action,
            "state": list(self.tying.state),
            "explored": proposal.explored,
            "structure_changed": self.tying.state != old_physical,
            # Numeric twins of the flag above, so TensorBoard (which skips booleans) shows settling.
            "changed_blocks": sum(a != b for a, b in zip(self.tying.state, old_physical)),
            "structure_changes": (self.history[-1]["structure_changes"] if self.history else 0)
            + (self.tying.state != old_physical),
            **plan.transition.counts(),
            **regrouped,
        }
        record.update(proposal.info)
        if proposal.state != record["state"]:
            record["policy_state"] = proposal.state
        if learns:
            if self.reward_delay:
                if delayed is not None:
                    record.update(delayed)
                self._pending = (state, proposal.action, proposal.state, index, loss_before)
            else:
                loss = self._measure()
                r = reward_from_loss(loss, self.reward)
                record.update({"reward": r, "reward_loss": loss})
                if self.sync.is_main:  # the others take the learned policy at the next broadcast
                    record.update(self.policy.observe(state, proposal.action, r, proposal.state))
            if not proposal.explored:
                self._greedy_seen.add(tuple(proposal.state))
            record["distinct_greedy_states"] = len(self._greedy_seen)
        self.policy_state = proposal.state
        trainable, total = count_parameters(self.tying.model)
        record.update({"n_independent": num_independent(self.tying.state), "trainable_params": trainable,
                       "total_params": total})
        self.history.append(record)
        return record

    def _follow_main(self, proposal: Proposal | None, delayed: dict | None):
        """Rank 0's proposal, delayed-reward record and policy state, on every rank."""
        if self.sync.world_size == 1:
            return proposal, delayed
        sent = self.sync.broadcast((proposal, delayed, self.policy.state_dict()) if self.sync.is_main else None)
        if not self.sync.is_main:
            self.policy.load_state_dict(sent[2])
        return sent[0], sent[1]

    def _verify_ranks(self, index: int) -> None:
        if self.sync.world_size > 1:
            self.sync.verify(f"the tie state after decision {index}", list(self.tying.state))
            # Under ZeRO-3 a partitioned tensor's data is an empty placeholder here (each element has one
            # owner, nothing to agree on); the tensors kept whole on every rank are compared.
            self.sync.verify(f"the weights after decision {index} (parameter checksum)",
                             param_checksum(unique_parameters(self.tying.model)))

    def _mean_gram(self) -> torch.Tensor:
        """The per-block gradient Gram matrix, averaged over ranks (each probes its own batch)."""
        if self.gradient_gram is None:
            raise RuntimeError("a splitting policy needs a gradient_gram callback")
        grams = self.sync.gather(self.gradient_gram().tolist())
        return torch.tensor(grams, dtype=torch.float64).mean(dim=0)

    def _measure(self) -> float:
        """The reward's loss, averaged over ranks (each measures on its own batch)."""
        if self.reward_loss is None:
            raise RuntimeError("a learning policy needs a reward_loss callback")
        return self.sync.mean(float(self.reward_loss()))

    def state_dict(self) -> dict:
        return {"tying": self.tying.state_dict(), "policy": self.policy.state_dict(),
                "policy_state": list(self.policy_state), "history": list(self.history),
                "greedy_seen": [list(s) for s in sorted(self._greedy_seen)],
                "pending": None if self._pending is None else [list(self._pending[0]), list(self._pending[1]),
                                                                list(self._pending[2]), self._pending[3],
                                                                self._pending[4]]}

    def load_state_dict(self, sd: dict) -> None:
        """Restore on a freshly built model *before* the optimizer is built (tying included)."""
        self.tying.load_state_dict(sd["tying"])
        self.policy.load_state_dict(sd["policy"])
        self.policy_state = list(sd["policy_state"])
        self.history = list(sd["history"])
        self._greedy_seen = {tuple(s) for s in sd["greedy_seen"]}
        pending = sd.get("pending")
        self._pending = None if pending is None else (list(pending[0]), list(pending[1]), list(pending[2]),
                                                      int(pending[3]), pending[4])

"""The paper's Q-learning agent (SPEC §1).

The Q-network reads the state ``s[1..L-1]`` and outputs, for every block i = 1..L-1, one value
per action 0..i: ``(L+2)(L-1)/2`` numbers. ``Q(s, a) = sum_i Q(s)[i, a[i]]``, so the greedy action
is the per-block argmax and ``max_a Q(s, a)`` is the sum of the per-block maxima.

Input scaling (ours to choose): ``s[i] / (L-1)``, so every input lies in [0, 1] whatever L is.

Options that change the learning problem (all off by default, so the default agent is the paper's):
``reward_norm="running"`` standardises rewards with a running mean/std, so the Q targets stay on the
scale the network starts at (with a raw -PPL reward the targets are hundreds of times larger than the
predictions and every update just pushes down whatever was chosen); ``target_sync=N`` computes
``max_a' Q(s')`` with a copy of the network refreshed every N updates; ``switch_cost=c`` subtracts
``c`` per block whose state changed, so a structure that works is not abandoned for free.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from megatie.errors import ConfigError
from megatie.state import validate_action, validate_state

REWARDS = ("neg-ppl", "neg-loss")
REWARD_NORMS = ("none", "running")


def reward_from_loss(loss: float, kind: str) -> float:
    """``neg-ppl`` (the paper): ``-exp(loss)``; ``neg-loss``: ``-loss`` (= ``-log PPL``)."""
    if kind == "neg-ppl":
        return -math.exp(min(loss, 80.0))  # exp(80) is already far beyond any PPL worth ranking
    if kind == "neg-loss":
        return -loss
    raise ConfigError(f"unknown reward {kind!r}; choose one of {', '.join(REWARDS)}")


class QNetwork(nn.Module):
    """MLP: (L-1) inputs -> 128 ReLU -> (L+2)(L-1)/2 outputs, one segment per block 1..L-1."""

    def __init__(self, num_blocks: int, hidden: int = 128):
        super().__init__()
        if num_blocks < 2:
            raise ConfigError("the Q-learning agent needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.num_outputs = (num_blocks + 2) * (num_blocks - 1) // 2
        self.net = nn.Sequential(
            nn.Linear(num_blocks - 1, hidden), nn.ReLU(), nn.Linear(hidden, self.num_outputs)
        )
        # Segment of block i starts at offsets[i-1]; it has i+1 entries (actions 0..i).
        offsets, o = [], 0
        for i in range(1, num_blocks):
            offsets.append(o)
            o += i + 1
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # Mask of valid (block, action) cells in a padded [L-1, L] layout.
        idx = torch.full((num_blocks - 1, num_blocks), -1, dtype=torch.long)
        for i in range(1, num_blocks):
            idx[i - 1, : i + 1] = torch.arange(offsets[i - 1], offsets[i - 1] + i + 1)
        self.register_buffer("padded_index", idx, persistent=False)

    def encode(self, state) -> torch.Tensor:
        s = torch.as_tensor(state, dtype=torch.float32, device=self.offsets.device)
        return s[..., 1:] / (self.num_blocks - 1)

    def forward(self, state) -> torch.Tensor:
        """Flat Q-values, shape ``[..., (L+2)(L-1)/2]``."""
        return self.net(self.encode(state))

    def padded(self, q: torch.Tensor) -> torch.Tensor:
        """``[..., L-1, L]`` with invalid actions (j > i) set to -inf."""
        valid = self.padded_index >= 0
        gathered = q[..., self.padded_index.clamp(min=0)]
        return gathered.masked_fill(~valid, float("-inf"))

    def q_of_action(self, q: torch.Tensor, action) -> torch.Tensor:
        a = torch.as_tensor(action, dtype=torch.long, device=q.device)[..., 1:]
        return q[..., self.offsets + a].sum(-1)

    def greedy(self, q: torch.Tensor) -> list[int]:
        return [0] + self.padded(q).argmax(-1).tolist()

    def max_value(self, q: torch.Tensor) -> torch.Tensor:
        return self.padded(q).amax(-1).sum(-1)


@dataclass
class AgentConfig:
    gamma: float = 0.99
    lr: float = 1e-3
    eps_start: float = 1.0
    eps_decay: float = 0.95
    eps_min: float = 0.1
    hidden: int = 128
    reward_norm: str = "none"
    target_sync: int = 0
    switch_cost: float = 0.0


class RunningStats:
    """Welford mean/variance of every reward seen so far (exact, order-independent state)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalise(self, x: float) -> float:
        # Before the spread is known, a reward carries no ranking information: centre it only.
        std = self.std
        return (x - self.mean) / std if std > 1e-12 else x - self.mean

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, sd: dict) -> None:
        self.count, self.mean, self.m2 = int(sd["count"]), float(sd["mean"]), float(sd["m2"])


class QLearningAgent:
    """Epsilon-greedy over whole action vectors, one TD(0) Adam step per decision."""

    def __init__(self, num_blocks: int, config: AgentConfig | None = None, seed: int = 0):
        self.config = config or AgentConfig()
        c = self.config
        if not (0 <= c.eps_min <= c.eps_start <= 1 and 0 < c.eps_decay <= 1 and 0 <= c.gamma < 1):
            raise ConfigError(f"invalid agent settings {c}")
        if c.reward_norm not in REWARD_NORMS or c.target_sync < 0 or c.switch_cost < 0:
            raise ConfigError(f"invalid agent settings {c}: reward_norm must be one of {', '.join(REWARD_NORMS)}, "
                              "target_sync and switch_cost non-negative")
        self.num_blocks = num_blocks
        # The agent's own generator: its exploration never shifts the trainer's random streams.
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.qnet = QNetwork(num_blocks, c.hidden)
        self.optimizer = torch.optim.Adam(self.qnet.parameters(), lr=c.lr)
        self.eps = c.eps_start
        self.reward_stats = RunningStats()
        self.updates = 0
        self.target_net = copy.deepcopy(self.qnet) if c.target_sync > 0 else None

    def random_action(self) -> list[int]:
        return [int(torch.randint(0, i + 1, (1,), generator=self.generator)) for i in range(self.num_blocks)]

    def greedy_action(self, state) -> list[int]:
        with torch.no_grad():
            return self.qnet.greedy(self.qnet(validate_state(state, self.num_blocks)))

    def act(self, state) -> tuple[list[int], bool]:
        """Return ``(action, explored)``: a whole random vector with probability eps, else greedy."""
        if float(torch.rand((), generator=self.generator)) < self.eps:
            return self.random_action(), True
        return self.greedy_action(state), False

    def update(self, state, action, reward: float, next_state) -> dict:
        """One TD step toward ``y = r + gamma * max_a' Q(s')``; decays eps afterwards."""
        action = validate_action(action, self.num_blocks)
        c = self.config
        raw = reward
        if c.reward_norm == "running":
            self.reward_stats.add(raw)
            reward = self.reward_stats.normalise(raw)
        if c.switch_cost:
            reward -= c.switch_cost * sum(a != b for a, b in zip(state, next_state))
        bootstrap = self.target_net if self.target_net is not None else self.qnet
        with torch.no_grad():
            target = reward + c.gamma * float(bootstrap.max_value(bootstrap(next_state)))
        q_sa = self.qnet.q_of_action(self.qnet(state), action)
        loss = (q_sa - target) ** 2
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.target_net is not None and self.updates % c.target_sync == 0:
            self.target_net.load_state_dict(self.qnet.state_dict())
        self.eps = max(self.eps * c.eps_decay, c.eps_min)
        out = {"q_pred": float(q_sa.detach()), "td_target": float(target),
               "td_error": float(target - q_sa.detach()), "eps": self.eps}
        if reward != raw:
            out["shaped_reward"] = reward
        return out

    def state_dict(self) -> dict:
        sd = {"qnet": self.qnet.state_dict(), "optimizer": self.optimizer.state_dict(), "eps": self.eps,
              "generator": self.generator.get_state(), "updates": self.updates,
              "reward_stats": self.reward_stats.state_dict()}
        if self.target_net is not None:
            sd["target_net"] = self.target_net.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.qnet.load_state_dict(sd["qnet"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.eps = float(sd["eps"])
        self.generator.set_state(sd["generator"])
        self.updates = int(sd["updates"])
        self.reward_stats.load_state_dict(sd["reward_stats"])
        if self.target_net is not None:
            self.target_net.load_state_dict(sd["target_net"])


"""The paper's Q-learning agent (SPEC §1).

The Q-network reads the state ``s[1..L-1]`` and outputs, for every block i = 1..L-1, one value
per action 0..i: ``(L+2)(L-1)/2`` numbers. ``Q(s, a) = sum_i Q(s)[i, a[i]]``, so the greedy action
is the per-block argmax and ``max_a Q(s, a)`` is the sum of the per-block maxima.

Input scaling (ours to choose): ``s[i] / (L-1)``, so every input lies in [0, 1] whatever L is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megatie.errors import ConfigError
from megatie.state import validate_action, validate_state

REWARDS = ("neg-ppl", "neg-loss")


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


class QLearningAgent:
    """Epsilon-greedy over whole action vectors, one TD(0) Adam step per decision."""

    def __init__(self, num_blocks: int, config: AgentConfig | None = None, seed: int = 0):
        self.config = config or AgentConfig()
        c = self.config
        if not (0 <= c.eps_min <= c.eps_start <= 1 and 0 < c.eps_decay <= 1 and 0 <= c.gamma < 1):
            raise ConfigError(f"invalid agent settings {c}")
        self.num_blocks = num_blocks
        # The agent's own generator: its exploration never shifts the trainer's random streams.
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.qnet = QNetwork(num_blocks, c.hidden)
        self.optimizer = torch.optim.Adam(self.qnet.parameters(), lr=c.lr)
        self.eps = c.eps_start

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
        with torch.no_grad():
            target = reward + self.config.gamma * float(self.qnet.max_value(self.qnet(next_state)))
        q_sa = self.qnet.q_of_action(self.qnet(state), action)
        loss = (q_sa - target) ** 2
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.eps = max(self.eps * self.config.eps_decay, self.config.eps_min)
        return {"q_pred": float(q_sa.detach()), "td_target": float(target),
                "td_error": float(target - q_sa.detach()), "eps": self.eps}

    def state_dict(self) -> dict:
        return {"qnet": self.qnet.state_dict(), "optimizer": self.optimizer.state_dict(), "eps": self.eps,
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.qnet.load_state_dict(sd["qnet"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.eps = float(sd["eps"])
        self.generator.set_state(sd["generator"])


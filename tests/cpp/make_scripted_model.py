"""Saves a scripted module that calls aaren.scan and aaren.step, for the C++ test to load."""
import sys
import warnings

import torch

import aaren


class ScanThenStep(torch.nn.Module):
    def forward(self, scores: torch.Tensor, values: torch.Tensor):
        out, state = aaren.scan(scores[:, :-1], values[:, :-1])
        last, state = aaren.step(scores[:, -1], values[:, -1], state)
        return torch.cat([out, last.unsqueeze(1)], dim=1), state[0]


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(ScanThenStep()).save(sys.argv[1])

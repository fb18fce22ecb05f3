"""Top-k counts and the end-of-run results table."""
import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k``.

    logits: (N, C) float; target: (N,) int64 class indices. ``k`` larger than C counts every
    sample. Returns a list of ints, one per ``k``.
    """
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices               # (N, maxk)
    hits = top.eq(target.view(-1, 1))                     # (N, maxk) bool
    return [int(hits[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


def format_table(rows: list, headers: list) -> str:
    """A Markdown table: ``headers`` a list of str, ``rows`` a list of lists of values."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in cells]
    lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return '\n'.join(lines)

"""Top-k counts, model size and cost, the end-of-run results table and the run plot."""
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .files import atomic_path


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k``.

    logits: (N, C) float; target: (N,) int64 class indices. ``k`` larger than C counts every
    sample. Returns an int64 tensor (len(ks),) on the logits' device (read without waiting for
    the GPU: validation adds them up there and reads the sums once).
    """
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices               # (N, maxk)
    hits = top.eq(target.view(-1, 1))                     # (N, maxk) bool
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks])


def format_table(rows: list, headers: list) -> str:
    """A Markdown table: ``headers`` a list of str, ``rows`` a list of lists of values."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |' for r in cells]
    lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return '\n'.join(lines)


def with_error_rates(result: dict) -> dict:
    """Add ``top_1_err = 1 - top_1`` and ``top_5_err = 1 - top_5`` (fractions) to an evaluation
    result, the error rates older ImageNet tools report. Returns a new dict."""
    return {**result, 'top_1_err': 1 - result['top_1'], 'top_5_err': 1 - result['top_5']}


def pct(fraction: float) -> str:
    """A fraction as a percentage with two decimals: 0.7612 -> '76.12 %'."""
    return f'{100 * fraction:.2f} %'


def results_table(summary: dict) -> str:
    """The end-of-run table (Markdown): arch, epochs, top-1/top-5 accuracy and error (%),
    parameters (millions) and GMACs per image at the validation resolution, wall time, train
    img/s; rows for the EMA weights and 10-crop results and lines for the best epoch (with
    ``checkpoint.keep_best``) and a top-1 target when present."""
    def number(key, fmt):
        return format(summary[key], fmt) if summary.get(key) is not None else '-'
    headers = ['arch', 'eval', 'epochs', 'top-1', 'top-5', 'top-1 err', 'top-5 err', 'params (M)',
               'GMACs', 'wall time', 'train img/s']
    rows = [[summary['arch'], f'centre {summary.get("val_res", "")} px'.replace('  ', ' ')
             + (' + flip' if summary.get('flip_tta', True) else ''),
             summary['epochs'], pct(summary['top_1']), pct(summary['top_5']),
             pct(summary['top_1_err']), pct(summary['top_5_err']), number('params_m', '.2f'),
             number('gmacs', '.3g'), f'{summary["wall_time_s"]:.0f} s',
             number('train_img_per_s', '.0f')]]
    if 'top_1_ema' in summary:
        rows.append([summary['arch'], 'EMA weights, as above', summary['epochs'],
                     pct(summary['top_1_ema']), pct(summary['top_5_ema']),
                     pct(1 - summary['top_1_ema']), pct(1 - summary['top_5_ema']), '', '', '', ''])
    if 'top_1_10crop' in summary:
        rows.append([summary['arch'], '10-crop', summary['epochs'], pct(summary['top_1_10crop']),
                     pct(summary['top_5_10crop']), pct(summary['top_1_err_10crop']),
                     pct(summary['top_5_err_10crop']), '', '', '', ''])
    table = format_table(rows, headers)
    if summary.get('best_epoch') is not None:
        table += (f'\nbest top-1 {pct(summary["best_top1"])} after epoch {summary["best_epoch"]}'
                  ' (best_weights.pt)')
    if summary.get('target_top1'):
        if summary.get('target_reached_epoch') is not None:
            table += (f'\ntarget top-1 {pct(summary["target_top1"])} reached at epoch '
                      f'{summary["target_reached_epoch"]}: time to accuracy '
                      f'{summary["time_to_target_s"]:.0f} s')
        else:
            table += f'\ntarget top-1 {pct(summary["target_top1"])} not reached'
    return table


@torch.no_grad()
def model_complexity(model: torch.nn.Module, res: int) -> dict:
    """Size and cost of ``model`` on one (1, 3, res, res) image: ``{'params_m': parameters in
    millions, 'gmacs': multiply-accumulates in billions}``.

    The operations are counted by torch's own ``torch.utils.flop_counter.FlopCounterMode`` (which
    counts 2 FLOPs per multiply-accumulate of convolutions and matrix products, and nothing for
    BatchNorm, ReLU or pooling) while one forward pass runs, in eval mode; BlurPool's depthwise blur
    convolutions are counted too. ResNet-50 at 224 px: 25.56 M, 4.09 GMACs, as torchvision lists.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, res, res, device=device))
    model.train(was_training)
    return {'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
            'gmacs': counter.get_total_flops() / 2 / 1e9}


def plot_log(log_path, png_path) -> None:
    """Plot a run's ``log.jsonl`` (one JSON record per epoch, see imagenet-ffcv-train) into a PNG of
    four panels against the epoch: train loss, validation top-1 (%), LR at the end of the epoch
    and training resolution (px). A value a record lacks leaves a gap (an epoch without
    validation in the top-1 panel; a record of a validation alone, ``RunDir.amend_log``). Raises
    OSError naming ``png_path`` when it cannot be written (a full disk)."""
    import matplotlib  # heavy, and only needed here
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    epochs = [r['epoch'] for r in records]
    nan = float('nan')
    panels = [('train loss', [r.get('train_loss', nan) for r in records]),
              ('top-1 (%)', [100 * r.get('top_1', nan) for r in records]),
              ('LR', [r.get('lr', nan) for r in records]),
              ('resolution (px)', [r.get('res', nan) for r in records])]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (title, values) in zip(axes.flat, panels):
        ax.plot(epochs, values, marker='o', markersize=3)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel('epoch')
    fig.suptitle(Path(log_path).parent.name)
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:  # a full disk leaves the last plot, not half of one
            fig.savefig(tmp, dpi=100, format='png')
    except OSError as e:  # a full disk named no file: the trainer said '[Errno 28] No space ...'
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(png_path)) from e
    finally:
        plt.close(fig)

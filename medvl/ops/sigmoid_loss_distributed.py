"""medvl.sigmoid_loss across ranks: local images against the texts of every rank.

Each rank's loss is that of open_clip's SigLipLoss with world_size > 1: the local pairs plus,
for every other rank's texts, all-negative pairs ("pair" target) or label/Jaccard targets
computed from the travelling labels. The fused kernel runs once per text chunk; the gradient of
each chunk is scaled by this rank's reduction and logit_scale and travels back to the chunk's
owner during the same pass, so backward only multiplies by grad_output.
"""

from __future__ import annotations

from typing import Optional

import torch

from medvl.ops import _exchange
from medvl.reference.sigmoid_loss import reduction_scale


class _DistributedSigmoidLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, image_labels, text_labels, target, reduction, group, dist_mode,
                backend, compute_grad):
        dim = image.shape[1]
        label_width = 0 if text_labels is None else (text_labels.shape[1] if text_labels.dim() == 2 else 1)
        sizes = _exchange.all_gather_sizes([image.shape[0], text.shape[0], dim, label_width], group, image.device)
        if (sizes[:, 2] != dim).any():
            raise ValueError(f"feature dimension differs across ranks: {sizes[:, 2].tolist()}")
        if (sizes[:, 3] != label_width).any():
            raise ValueError(f"label width differs across ranks: {sizes[:, 3].tolist()}")
        rank = torch.distributed.get_rank(group)
        text_counts = sizes[:, 1].tolist()
        factor = reduction_scale(reduction, image.shape[0], sum(text_counts))
        carries_labels = target != "pair"

        totals = {"loss": image.new_zeros((), dtype=torch.float32)}
        if compute_grad:
            totals.update(gsum=totals["loss"].clone(), scale_grad=totals["loss"].clone(),
                          grad_image=torch.zeros(image.shape, dtype=torch.float32, device=image.device))
        # Each rank's contribution to a text chunk's gradient is already multiplied by its own
        # reduction factor and logit_scale, so ranks may differ in batch size.
        contribution_factor = scale.detach() * factor

        def process(owner: int, chunk):
            chunk_text = chunk[0]
            chunk_labels = chunk[1] if carries_labels else None
            loss_sum, gsum, scale_grad, grad_image, grad_text = torch.ops.medvl.sigmoid_loss_forward(
                image, chunk_text, scale, bias, image_labels, chunk_labels, target, owner == rank,
                compute_grad, backend,
            )
            totals["loss"] += loss_sum
            if not compute_grad:
                return None
            totals["gsum"] += gsum
            totals["scale_grad"] += scale_grad
            totals["grad_image"] += grad_image
            return grad_text.mul_(contribution_factor)

        own = (text,) + ((text_labels,) if carries_labels else ())

        def chunk_like(owner: int):
            rows = text_counts[owner]
            buffers = (text.new_empty((rows, dim)),)
            if carries_labels:
                buffers += (text_labels.new_empty((rows,) + tuple(text_labels.shape[1:])),)
            return buffers

        def gradient_like(owner: int):
            return torch.empty((text_counts[owner], dim), dtype=torch.float32, device=text.device)

        if dist_mode == "ring":
            grad_text = _exchange.ring_pass(own, chunk_like, gradient_like, process, group)
        else:
            grad_text = _exchange.broadcast_pass(own, chunk_like, process, group)

        ctx.compute_grad = compute_grad
        ctx.group = group
        ctx.dtypes = (image.dtype, text.dtype)
        if compute_grad:
            ctx.factor = factor
            ctx.save_for_backward(scale, totals["gsum"], totals["scale_grad"], totals["grad_image"], grad_text)
        return totals["loss"] * factor

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.compute_grad:
            raise RuntimeError("medvl.sigmoid_loss ran without grad enabled, so it kept no gradients")
        # The text gradient already sums every rank's contribution, which is right only if every
        # rank's loss receives the same grad_output (loss.backward() on each rank does).
        # Checked on the device (an asynchronous assert on CUDA): no host sync at the start of backward.
        outputs = _exchange.all_gather_scalar(grad_loss, ctx.group)
        torch._assert_async((outputs == outputs[0]).all(),
                            "medvl.sigmoid_loss with a process group needs the same grad_output on every rank; "
                            "scale the loss identically on every rank")
        scale, gsum, scale_grad, grad_image, grad_text = ctx.saved_tensors
        image_dtype, text_dtype = ctx.dtypes
        grad_loss = grad_loss.float()
        local = grad_loss * ctx.factor
        return (
            (grad_image * (local * scale.float())).to(image_dtype),
            (grad_text * grad_loss).to(text_dtype),
            local * scale_grad,
            local * gsum,
            None, None, None, None, None, None, None, None,
        )


def distributed_sigmoid_loss(image, text, scale, bias, target: str, image_labels: Optional[torch.Tensor],
                             text_labels: Optional[torch.Tensor], reduction: str, group, dist_mode: str,
                             backend: str, compute_grad: bool) -> torch.Tensor:
    return _DistributedSigmoidLoss.apply(
        image, text, scale, bias, image_labels, text_labels, target, reduction, group, dist_mode, backend,
        compute_grad,
    )

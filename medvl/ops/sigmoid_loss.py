"""medvl::sigmoid_loss: the sigmoid contrastive (SigLIP) loss with fused gradients.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023). The loss of local images
against texts is sum_ij BCE-with-logits(s * <x_i, t_j> + b, y_ij): y from the pairing (SigLIP),
from class labels (MR-CLIP's contrast categories: several positives a row), or soft Jaccard
targets of multi-hot labels (PRIMA-style).

Every fused backend computes the loss and, when an input requires grad, the gradients in the
same pass: sum_j g_ij t_j and sum_i g_ij x_i with g = sigmoid(z) - y. Nothing of size
B_img x B_txt is allocated (the Triton backend's chunked strategy on a GPU holds one chunk of
image rows x B_txt, 512 MiB at most); the gradients of the features are kept (O(B * D)) and
backward only scales them by the incoming gradient.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from medvl.ops import _core, _dispatch
from medvl.ops._core import _C
from medvl.ops._labels import pack_multi_hot, unpack_bits
from medvl.options import look_up_option
from medvl.reference import sigmoid_loss as reference  # the module

TARGETS = reference.TARGETS  # by name everywhere; a code only where csrc takes it (its enum's order)
REDUCTIONS = reference.REDUCTIONS
DIST_MODES = ("ring", "allgather")
OP = "sigmoid_loss"


# --------------------------------------------------------------------------------------------
# Backends. Each takes (image, text, logit_scale, logit_bias, target name, diagonal_is_pair,
# image_labels, text_labels, compute_grad) with validated, contiguous inputs and returns
# (row_loss[Bi], row_gsum[Bi], grad_image[Bi, D], grad_text[Bt, D]) in float32.
# --------------------------------------------------------------------------------------------


def _label_words(target: str, image_labels: Optional[torch.Tensor]) -> int:
    return image_labels.shape[1] if target == "jaccard" else 0


def _run_compiled(image, text, logit_scale, logit_bias, target, diagonal_is_pair, image_labels, text_labels,
                  compute_grad):
    """The C++ (CPU tensors) or CUDA (CUDA tensors) kernel: same arguments, outputs allocated by torch."""
    n_image, dim = image.shape
    n_text = text.shape[0]
    on_cuda = image.device.type == "cuda"
    row_loss = image.new_empty(n_image, dtype=torch.float32)
    if compute_grad:
        row_gsum = image.new_empty(n_image, dtype=torch.float32)
        grad_image = image.new_empty(n_image, dim, dtype=torch.float32)
        grad_text = image.new_empty(n_text, dim, dtype=torch.float32)
    else:
        row_gsum = grad_image = grad_text = image.new_empty(0, dtype=torch.float32)
    threads = _core.cpu_threads()
    nbytes = (_C.sigmoid_loss_cuda_workspace_bytes(n_image, n_text, dim, compute_grad) if on_cuda
              else _C.sigmoid_loss_cpu_workspace_bytes(n_image, n_text, dim, compute_grad, threads))
    scratch = _core.workspace(nbytes, image.device)
    is_label, is_jaccard = target == "label", target == "jaccard"
    arguments = dict(
        image=image.data_ptr(), text=text.data_ptr(), n_image=n_image, n_text=n_text, dim=dim,
        dtype=_core.DTYPE_CODES[image.dtype], logit_scale=logit_scale.data_ptr(), logit_bias=logit_bias.data_ptr(),
        target=TARGETS.index(target), diagonal_is_pair=diagonal_is_pair,
        image_labels=_core.pointer(image_labels if is_label else None),
        text_labels=_core.pointer(text_labels if is_label else None),
        image_bits=_core.pointer(image_labels if is_jaccard else None),
        text_bits=_core.pointer(text_labels if is_jaccard else None),
        label_words=_label_words(target, image_labels), compute_grad=compute_grad,
        row_loss=row_loss.data_ptr(), row_gsum=_core.pointer(row_gsum), grad_image=_core.pointer(grad_image),
        grad_text=_core.pointer(grad_text), workspace=scratch.data_ptr(), workspace_bytes=scratch.numel(),
    )
    if on_cuda:
        with torch.cuda.device(image.device):
            _C.sigmoid_loss_cuda(torch.cuda.current_stream(image.device).cuda_stream, **arguments)
    else:
        _C.sigmoid_loss_cpu(threads, **arguments)
    return row_loss, row_gsum, grad_image, grad_text


def _run_triton(image, text, logit_scale, logit_bias, target, diagonal_is_pair, image_labels, text_labels, compute_grad):
    from medvl.kernels import sigmoid_loss as triton_kernels

    return triton_kernels.sigmoid_loss_forward(
        image, text, logit_scale, logit_bias, target, diagonal_is_pair, image_labels, text_labels, compute_grad
    )


def _run_reference(image, text, logit_scale, logit_bias, target, diagonal_is_pair, image_labels, text_labels, compute_grad):
    if target == "jaccard":
        image_labels, text_labels = unpack_bits(image_labels), unpack_bits(text_labels)
    return reference.sigmoid_loss_parts(
        image, text, logit_scale, logit_bias, target=target, image_labels=image_labels, text_labels=text_labels,
        diagonal_is_pair=diagonal_is_pair, compute_grad=compute_grad,
    )


_RUNNERS = {"cpu": _run_compiled, "cuda": _run_compiled, "triton": _run_triton, "reference": _run_reference}


def _cpu_reasons(image, text) -> List[str]:
    return _core.cpu_backend_reasons(image, "sigmoid_loss_cpu")


def _cuda_reasons(image, text) -> List[str]:
    return _core.cuda_backend_reasons(image, "sigmoid_loss_cuda")


def _triton_reasons(image, text) -> List[str]:
    return _core.triton_backend_reasons(image, OP)


BACKENDS = {
    "cpu": _dispatch.Backend("cpu", _cpu_reasons),
    "cuda": _dispatch.Backend("cuda", _cuda_reasons),
    "triton": _dispatch.Backend("triton", _triton_reasons),
    "reference": _dispatch.Backend("reference", lambda image, text: []),
}


# --------------------------------------------------------------------------------------------
# The op: one pass of local images against one chunk of texts.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("medvl::sigmoid_loss_forward", mutates_args=())
def sigmoid_loss_forward(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_labels: Optional[torch.Tensor],
    text_labels: Optional[torch.Tensor],
    target: str,
    diagonal_is_pair: bool,
    compute_grad: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss_sum, gsum, scale_grad, grad_image, grad_text), all float32.

    loss_sum = sum_ij loss_ij; gsum = sum_ij g_ij = d loss_sum / d logit_bias;
    scale_grad = sum_ij g_ij <x_i, t_j> = d loss_sum / d logit_scale;
    grad_image = sum_j g_ij t_j and grad_text = sum_i g_ij x_i (multiply by logit_scale for the
    feature gradients). Without compute_grad, all but loss_sum are empty.
    """
    row_loss, row_gsum, grad_image, grad_text = _RUNNERS[backend](
        image, text, logit_scale, logit_bias, target, diagonal_is_pair, image_labels, text_labels, compute_grad
    )
    loss_sum = row_loss.sum()
    if image.device.type == "cpu" and not torch.isfinite(loss_sum):
        _explain_non_finite(image, text, logit_scale, logit_bias)
    if not compute_grad:
        # Separate empties: a custom op's outputs may not alias each other.
        return (loss_sum, *(row_loss.new_empty(0) for _ in range(4)))
    return loss_sum, row_gsum.sum(), _rowwise_dot_sum(image, grad_image), grad_image, grad_text


def _rowwise_dot_sum(image: torch.Tensor, grad_image: torch.Tensor, rows_per_chunk: int = 4096) -> torch.Tensor:
    """sum_i <x_i, grad_image_i> in float32 (d loss_sum / d logit_scale) without a B x D temporary:
    one dot product for float32 features, row chunks of bounded size for 16-bit ones."""
    if image.dtype == torch.float32:
        return torch.dot(image.reshape(-1), grad_image.reshape(-1))
    total = grad_image.new_zeros(())
    for start in range(0, image.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        total += torch.dot(image[chunk].reshape(-1).float(), grad_image[chunk].reshape(-1))
    return total


@sigmoid_loss_forward.register_fake
def _(image, text, logit_scale, logit_bias, image_labels, text_labels, target, diagonal_is_pair, compute_grad, backend):
    scalar = image.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return (scalar, *(image.new_empty(0, dtype=torch.float32) for _ in range(4)))
    return (
        scalar,
        scalar.clone(),
        scalar.clone(),
        image.new_empty(image.shape, dtype=torch.float32),
        text.new_empty(text.shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias = inputs[:4]
    compute_grad = inputs[8]
    _, gsum, scale_grad, grad_image, grad_text = output
    ctx.compute_grad = compute_grad
    ctx.dtypes = (image.dtype, text.dtype, logit_scale.dtype, logit_bias.dtype)
    ctx.save_for_backward(logit_scale, gsum, scale_grad, grad_image, grad_text)


def _backward(ctx, grad_loss, _grad_gsum, _grad_scale_grad, _grad_image, _grad_text):
    if not ctx.compute_grad:
        raise RuntimeError(
            "medvl::sigmoid_loss_forward ran with compute_grad=False, so it kept no gradients; "
            "call medvl.sigmoid_loss with grad enabled and an input that requires grad"
        )
    logit_scale, gsum, scale_grad, grad_image, grad_text = ctx.saved_tensors
    image_dtype, text_dtype, scale_dtype, bias_dtype = ctx.dtypes
    feature_factor = grad_loss * logit_scale.float()
    return (
        (grad_image * feature_factor).to(image_dtype),
        (grad_text * feature_factor).to(text_dtype),
        (grad_loss * scale_grad).to(scale_dtype),
        (grad_loss * gsum).to(bias_dtype),
        None, None, None, None, None, None,
    )


sigmoid_loss_forward.register_autograd(_backward, setup_context=_setup_context)


def _explain_non_finite(image, text, logit_scale, logit_bias) -> None:
    """Called only when the loss came out non-finite on CPU: name the input that caused it."""
    for name, tensor in (("logit_scale", logit_scale), ("logit_bias", logit_bias),
                         ("image_features", image), ("text_features", text)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or infinity; the sigmoid loss needs finite inputs")


# --------------------------------------------------------------------------------------------
# Validation and the public function.
# --------------------------------------------------------------------------------------------


def _check_features(image: torch.Tensor, text: torch.Tensor) -> None:
    for name, tensor in (("image_features", image), ("text_features", text)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(tensor.shape)}); pass at least one row")
        if tensor.shape[1] == 0:
            raise ValueError(f"{name} has feature dimension 0")
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"image_features and text_features must have the same feature dimension, "
            f"got {image.shape[1]} and {text.shape[1]}"
        )
    if image.dtype != text.dtype:
        raise TypeError(
            f"image_features ({image.dtype}) and text_features ({text.dtype}) must have the same dtype; "
            f"cast one of them"
        )
    if image.device != text.device:
        raise ValueError(
            f"image_features is on {image.device} and text_features on {text.device}; move them to one device"
        )


def _as_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """logit_scale / logit_bias as a differentiable 0-d float32 tensor on the features' device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        if not value.is_floating_point():
            value = value.float()
        scalar = value.reshape(()).float()
    elif isinstance(value, (int, float)):
        scalar = torch.tensor(float(value), dtype=torch.float32, device=like.device)
    else:
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if scalar.device.type == "cpu" and not torch.compiler.is_compiling():
        if not math.isfinite(float(scalar.detach())):
            raise ValueError(f"{name} must be finite, got {float(scalar.detach())}")
    return scalar


def _check_labels(target: str, image_labels, text_labels, image: torch.Tensor, text: torch.Tensor):
    """Validated labels for `target`, in the form the kernels read; (None, None) for 'pair'."""
    look_up_option(target, TARGETS, name="target")
    if target == "pair":
        if image_labels is not None or text_labels is not None:
            raise ValueError("image_labels/text_labels are only used with target='label' or target='jaccard'")
        return None, None
    if image_labels is None:
        raise ValueError(f"target={target!r} needs image_labels")
    if text_labels is None:
        if image.shape[0] != text.shape[0]:
            raise ValueError(
                f"target={target!r} needs text_labels when image and text batches differ in size "
                f"({image.shape[0]} vs {text.shape[0]})"
            )
        text_labels = image_labels
    checked = []
    for name, labels, rows in (("image_labels", image_labels, image.shape[0]), ("text_labels", text_labels, text.shape[0])):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
        if labels.device != image.device:
            raise ValueError(f"{name} is on {labels.device} but the features are on {image.device}")
        if target == "label":
            if labels.dim() != 1 or labels.shape[0] != rows:
                raise ValueError(f"{name} must have shape ({rows},) for target='label', got {tuple(labels.shape)}")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer class ids for target='label', got {labels.dtype}")
            checked.append(labels.to(torch.int64).contiguous())
        else:
            if labels.dim() != 2 or labels.shape[0] != rows:
                raise ValueError(
                    f"{name} must be multi-hot of shape ({rows}, num_classes) for target='jaccard', "
                    f"got {tuple(labels.shape)}"
                )
            if labels.is_floating_point() or labels.is_complex():
                raise TypeError(f"{name} must be bool (or integer 0/1) multi-hot for target='jaccard', got {labels.dtype}")
            checked.append(labels)
    if target == "jaccard":
        if checked[0].shape[1] != checked[1].shape[1]:
            raise ValueError(
                f"image_labels and text_labels must have the same number of classes, "
                f"got {checked[0].shape[1]} and {checked[1].shape[1]}"
            )
        checked = [pack_multi_hot(labels) for labels in checked]
    return checked[0], checked[1]


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    target: str = "pair",
    image_labels: Optional[torch.Tensor] = None,
    text_labels: Optional[torch.Tensor] = None,
    reduction: str = "image_mean",
    group=None,
    dist_mode: str = "ring",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sigmoid contrastive loss of image features against text features, gradients fused.

    Args:
        image_features: (B_img, D) float32/bfloat16/float16 (float64 runs on the reference).
        text_features: (B_txt, D), same dtype and device.
        logit_scale: the multiplier of the logits (open_clip passes ``logit_scale.exp()``).
        logit_bias: added to every logit.
        target: "pair" (text i belongs to image i), "label" (int64 class ids: every text of the
            image's class is a positive), or "jaccard" (multi-hot (B, K) bool labels: soft target
            |a & b| / |a | b|, two empty sets count as identical, own pair always 1).
        image_labels, text_labels: for "label"/"jaccard"; text_labels defaults to image_labels
            when the batch is paired.
        reduction: "image_mean" (divide by the local image count, open_clip's convention),
            "mean" (over all image-text pairs) or "sum".
        group: a torch.distributed process group (or None). With more than one rank, each rank's
            loss is that of its images against the texts of every rank, as open_clip's SigLipLoss
            defines it; text chunks travel around a ring ("ring") or by chunked collectives
            ("allgather"), and each chunk's gradient returns to its owner. Every rank must
            backpropagate the same grad_output (true for ``loss.backward()``).
        backend: "cuda", "triton", "cpu", "reference" or None (automatic; MEDVL_BACKEND overrides).

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
        >>> t = torch.nn.functional.normalize(torch.randn(8, 32), dim=-1)
        >>> loss = sigmoid_loss(x, t, torch.tensor(10.0), torch.tensor(-10.0))
    """
    _check_features(image_features, text_features)
    look_up_option(reduction, REDUCTIONS, name="reduction")
    look_up_option(dist_mode, DIST_MODES, name="dist_mode")
    scale = _as_scalar("logit_scale", logit_scale, image_features)
    bias = _as_scalar("logit_bias", logit_bias, image_features)
    image_labels, text_labels = _check_labels(target, image_labels, text_labels, image_features, text_features)
    image = image_features.contiguous()
    text = text_features.contiguous()
    chosen = _dispatch.choose_backend(OP, BACKENDS, backend, image.device, image, text)
    compute_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (image, text, scale, bias)
    )

    if group is not None:
        from medvl.ops import _exchange

        if _exchange.world_size(group) > 1:
            from medvl.ops.sigmoid_loss_distributed import distributed_sigmoid_loss

            return distributed_sigmoid_loss(
                image, text, scale, bias, target, image_labels, text_labels, reduction,
                group, dist_mode, chosen, compute_grad,
            )

    loss_sum = torch.ops.medvl.sigmoid_loss_forward(
        image, text, scale, bias, image_labels, text_labels, target, True, compute_grad, chosen
    )[0]
    return loss_sum * reference.reduction_scale(reduction, image.shape[0], text.shape[0])

"""Knowledge distillation (teacher=checkpoints): the network also learns from a trained teacher's softened outputs.

Hinton et al. (2015): the loss is (1 − w) · CE(student, labels) + w · T² · KL(softmax(teacher / T) ‖ softmax(student
/ T)). A temperature T > 1 softens both distributions, so the teacher's view of which wrong classes are nearly right
(a cat that looks like a dog) carries over; T² keeps the soft term's gradients at the hard term's scale. The teacher
sees the very batch the student sees, augmented the same way ("consistent" teaching, Beyer et al. 2022), computed
on the fly. A teacher is one or more cnnlab checkpoints (several: the mean of their logits, an ensemble), each
with the normalisation it was trained with; it is neither trained nor saved in the student's checkpoints.
"""

import torch
from torch import nn
from torch.nn import functional as F

from cnnlab import UserError
from cnnlab.checkpoints import load_checkpoint
from cnnlab.data.pixels import scale_and_shift
from cnnlab.trained import deployable_from_checkpoint, resolve_model_path


class Teacher(nn.Module):
    """The mean logits of trained networks for the student's normalised images (each network's input converted from
    the student's normalisation to its own: x · std_s / std_t + (mean_s − mean_t) / std_t)."""

    def __init__(self, nets: list[nn.Module], conversions: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.nets = nn.ModuleList(net.eval().requires_grad_(False) for net in nets)
        self.register_buffer("scales", torch.stack([scale for scale, _ in conversions]))  # a 1×C×1×1 each
        self.register_buffer("shifts", torch.stack([shift for _, shift in conversions]))

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always in eval mode: no dropout in the teacher

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.scales.dtype)  # float32 weights, whatever the student's precision (64-true)
        logits = [net(images * self.scales[i] + self.shifts[i]) for i, net in enumerate(self.nets)]
        return torch.stack(logits).float().mean(0)


def load_teacher(paths: list[str], mean: list[float], std: list[float], classes: list[str], shape) -> Teacher:
    """The teacher of teacher.checkpoints, for a student whose data has `classes`, `mean`/`std` and image `shape`."""
    nets, conversions = [], []
    student_scale, student_shift = scale_and_shift(mean, std)  # uint8 → the student's input: x · s + t
    for path in paths:
        net, description = teacher_member(path)
        if list(description["classes"]) != list(classes):
            raise UserError(f"teacher.checkpoints: {path} was trained on the classes {description['classes']}, the "
                            f"data's are {list(classes)}: a teacher of the same data set")  # fmt: skip
        if tuple(description["input_shape"]) != tuple(shape):
            raise UserError(f"teacher.checkpoints: {path} takes {description['input_shape']} images, the data's "
                            f"are {list(shape)}: a teacher of the same data set")  # fmt: skip
        scale, shift = net.scale, net.shift  # uint8 → the teacher's input: x · s' + t'
        # the student's input z = x · s + t, so x = (z − t) / s, and the teacher's input is z · s'/s + t' − t · s'/s
        conversions.append((scale / student_scale, shift - student_shift * scale / student_scale))
        nets.append(net.net)
    return Teacher(nets, conversions)


def teacher_member(path: str):
    """One network of the teacher (a checkpoint, or a run folder: its best checkpoint), with its checkpoint's
    description; a file that is not one, one line."""
    try:
        path = resolve_model_path(str(path), "outputs")
        checkpoint = load_checkpoint(path)
        if "cnnlab" not in checkpoint:
            raise UserError(f"{path} does not describe its model (not written by cnnlab's train.py)")
        return deployable_from_checkpoint(checkpoint, path)
    except UserError as err:
        raise UserError(f"teacher.checkpoints: {str(err).removeprefix('ckpt_path=')}") from None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, hard_loss: torch.Tensor, temperature: float,
                      weight: float) -> torch.Tensor:  # fmt: skip
    """(1 − weight) · the labels' loss + weight · T² · KL(teacher_T ‖ student_T), averaged over the batch."""
    soft = F.kl_div(F.log_softmax(student.float() / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    log_target=True, reduction="batchmean")  # fmt: skip
    return (1 - weight) * hard_loss + weight * temperature**2 * soft

"""The run's TensorBoard writer: scalars readable by TensorBoard, and no torch import on the way
(tensorboardX would otherwise load all of torch in every `sptlm train` process)."""

import struct
import subprocess
import sys

from tensorboardX.proto import event_pb2


def _scalars(logdir) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in the event files (TFRecord framing: length, its CRC,
  the record, its CRC)."""
  out = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def test_summary_writer_writes_scalars_without_loading_torch(tmp_path):
  code = ("import sys; from sptlm.train.metrics import summary_writer\n"
          f"w = summary_writer({str(tmp_path)!r})\n"
          "for step in (1, 2): w.add_scalar('loss', 3.0 / step, step)\n"
          "w.close(); print('torch' in sys.modules)\n"
          "import torch; print(torch.ones(2).sum().item())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["False", "2.0"]  # torch stays importable afterwards
  assert _scalars(tmp_path) == [(1, "loss", 3.0), (2, "loss", 1.5)]

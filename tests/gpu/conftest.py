"""GPU tests run only where CUDA is: on a CPU machine these files are not collected at all."""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

"""The hardware catalogue's starting rows. New generations are data: add a row here (or in the admin).

INT8 figures follow public reporting (HW3 about 144 TOPS, HW4 about 245 TOPS at about 100 W). The FP32
figures are the on-board GPUs' and are planning assumptions, marked as such in each row's notes; operators
correct them in the admin, and a sync never overwrites a row that exists."""

from fleet.models import HardwareGeneration, HardwareThroughput

HARDWARE = [
    ("HW3", "Hardware 3 (FSD computer 1)", 72, "in_service", {"int8": 144_000, "fp32": 600},
     "INT8 144 TOPS (public figure). FP32 600 GFLOPS on the GPU: assumption."),
    ("HW4", "Hardware 4 (AI4)", 100, "in_service", {"int8": 245_000, "fp32": 1_000},
     "INT8 about 245 TOPS at about 100 W (public figures). FP32 1 TFLOPS on the GPU: assumption."),
    ("HW5", "Hardware 5 (AI5, in design)", 150, "in_design", {"int8": 2_000_000, "fp16": 1_000_000, "fp32": 10_000},
     "In design: every figure is a placeholder until the hardware ships."),
]


def hardware_catalogue_sync() -> None:
    """Create the catalogue rows that are missing (runs after every migrate and test-database flush)."""
    for code, name, watts, status, throughputs, notes in HARDWARE:
        hardware, created = HardwareGeneration.objects.get_or_create(
            code=code, defaults={"name": name, "watts": watts, "status": status, "notes": notes})
        if created:
            HardwareThroughput.objects.bulk_create(
                HardwareThroughput(hardware=hardware, precision=p, gops_per_s=g) for p, g in throughputs.items())

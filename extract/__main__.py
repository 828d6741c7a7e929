"""``python -m lt_rebalance.extract`` (also what ``torchrun -m lt_rebalance.extract`` runs)."""
from .cli import extract

if __name__ == "__main__":  # pragma: no cover
    extract.main(prog_name="python -m lt_rebalance.extract")

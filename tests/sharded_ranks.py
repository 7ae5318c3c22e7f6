"""One rank of the sharded-featurizer equality test (tests/test_sharded.py starts N of these with
RANK / WORLD_SIZE / MASTER_PORT set): each tiny family's model is sharded with FSDP2 over the
ranks, and this rank featurizes its own examples (every N-th row of one batch, in batches of
rank+1 rows, so the ranks run different numbers of steps and Lockstep's dummy steps are used).

    python tests/sharded_ranks.py OUT_DIR DEVICE FAMILY[,FAMILY...]

Writes OUT_DIR/rank{r}.pt: {family: (row indices, {variant: vectors})}."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_featurizer import fake_adam  # noqa: E402
from tiny_models import make_model, random_batch  # noqa: E402

from trackstar_db.featurizer import Featurizer, FeaturizerConfig, build_second_moment  # noqa: E402
from trackstar_db.gradients.sharded import Lockstep, mesh_for, process_group, shard_model  # noqa: E402

CONFIG = FeaturizerConfig(dim=1024, correction="adam-factored")
ROWS, SEED = 7, 5


def main(out: str, device: str, families: list[str]) -> None:
    with process_group(device) as rank:
        batch = random_batch(ROWS, seed=SEED)
        rows = list(range(rank.rank, ROWS, rank.world))
        size = rank.rank + 1
        saved = {}
        for family in families:
            reference = make_model(family)  # the optimizer state is made from the unsharded names and shapes
            model = shard_model(make_model(family), mesh_for(rank))
            moment = build_second_moment(CONFIG, model, optimizer_state=fake_adam(reference))
            featurizer = Featurizer(model, CONFIG, moment, device=rank.device, uncorrected=True)
            chunks = [rows[i: i + size] for i in range(0, len(rows), size)]
            parts = []
            for chunk in Lockstep(featurizer, rank.device)(iter(chunks)):
                parts.append(featurizer.featurize({k: v[chunk] for k, v in batch.items()}).vectors)
            saved[family] = (rows, {v: torch.cat([p[v] for p in parts]) for v in featurizer.variants})
        torch.save(saved, os.path.join(out, f"rank{rank.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))

"""What every stage needs to know about the run: spec, run directory, shards, format and resources."""

from __future__ import annotations

from dataclasses import dataclass

from rebalance.data.readers import Shard
from rebalance.runtime.manifest import RunDir
from rebalance.runtime.session import ClusterResources
from rebalance.spec import Spec

__all__ = ["StageContext"]


@dataclass
class StageContext:
    """The run being executed. ``image_column``/``text_column`` are None for an absent side."""

    spec: Spec
    run: RunDir
    shards: list[Shard]
    fmt: str
    image_column: str | None
    text_column: str | None
    resources: ClusterResources

    @property
    def sides(self) -> list[str]:
        """The modalities present in the dataset, among ``image`` and ``text``."""
        return [s for s, c in (("image", self.image_column), ("text", self.text_column)) if c is not None]

    @property
    def cluster_sides(self) -> list[str]:
        """The sides the cluster stage assigns: :attr:`sides`, plus ``joint`` with ``cluster.joint``."""
        return self.sides + (
            ["joint"] if self.spec.cluster.joint is not None and len(self.sides) == 2 else []
        )

    def workers(self, n_items: int) -> int:
        """Number of CPU actors for ``n_items`` shards: one per CPU, at most one per shard."""
        return max(1, min(n_items, self.resources.cpus or 1))

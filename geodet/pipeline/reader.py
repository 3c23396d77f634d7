"""Reading a scene's tiles into batches: in-process into one reused buffer, or a torch dataset
for DataLoader workers (each opens its own file handle)."""

from __future__ import annotations

from .grid import TileGrid


class TileDataset:
    """A torch map-style dataset of a scene's tiles: ``(image [C, T, T], tile, valid_fraction)``.

    The scene object is pickled without its file handle, so each DataLoader worker opens its own.
    """

    def __init__(self, scene, grid: TileGrid, indices=None):
        scene.stats  # computed once here, not in every worker
        self.scene = scene
        self.grid = grid
        self.indices = list(range(len(grid))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        tile = self.grid.tile(self.indices[i])
        data, frac = self.scene.read_tile(tile)
        return torch.from_numpy(data), tile, frac


def read_batches(scene, grid: TileGrid, batch_size: int, min_valid_fraction: float = 0.0, indices=None):
    """Batches read in this process into one reused buffer: ``(images [n, C, T, T] or None,
    tiles, skipped)``, the batches a DataLoader over ``TileDataset`` with ``make_collate`` gives,
    without a per-tile array, a stacking copy or a new batch allocation each time. ``indices``
    (default: every tile) picks the tiles, e.g. one block of the grid.

    Each batch's ``images`` are overwritten by the next batch: use them before asking for it.
    """
    import torch

    indices = list(range(len(grid))) if indices is None else list(indices)
    buf = torch.empty((batch_size, scene.count, grid.tile_size, grid.tile_size))
    arr = buf.numpy()
    for start in range(0, len(indices), batch_size):
        tiles, skipped = [], []
        for i in indices[start : start + batch_size]:
            tile = grid.tile(i)
            _, frac = scene.read_tile(tile, out=arr[len(tiles)])
            (tiles if frac > min_valid_fraction else skipped).append(tile)
        yield (buf[: len(tiles)] if tiles else None), tiles, skipped


def worker_init(_worker_id: int) -> None:
    """DataLoader workers use one thread each: oversubscribed threads slow the model badly."""
    import torch

    torch.set_num_threads(1)


def make_collate(min_valid_fraction: float):
    """A collate function that drops tiles at or below ``min_valid_fraction`` valid pixels."""

    def collate(samples):
        import torch

        keep = [s for s in samples if s[2] > min_valid_fraction]
        skipped = [s[1] for s in samples if s[2] <= min_valid_fraction]
        images = torch.stack([s[0] for s in keep]) if keep else None
        return images, [s[1] for s in keep], skipped

    return collate

"""The teacher cache: the teacher's top-k log-probs and greedy translations, stored once, reused by
every student, run and world size.

Modules, in data-flow order:

* :mod:`~engine.cache.codec`: the compact top-k record (ids, 1/8-nat log-probs, tail mass; LZMA, CRC);
* :mod:`~engine.cache.format`: shard, pack and record bytes; what a cache is of and whether it fits a run;
* :mod:`~engine.cache.teacher`: the teacher pass over a batch (word-level top-k, greedy translation,
  the ZeRO-3 sharded teacher);
* :mod:`~engine.cache.build`: ``stc cache build`` (work split over ranks, resume, ``meta.json``);
* :mod:`~engine.cache.verify`: ``stc cache verify``;
* :mod:`~engine.cache.join`: what the training stream is handed to join cache records to audio samples.

Imports flow one way: codec <- format <- (teacher, verify, join) <- build. Nothing here is imported by
:mod:`engine.data`; the trainer builds a :class:`~engine.cache.join.CacheJoin` and hands it to the stream.
"""

"""The embedded demo: a speech-translation task small enough for two CPU cores.

* :mod:`~engine.demo.quantities`: the phrase generator (spoken quantities -> German / Chinese);
* :mod:`~engine.demo.data`: ``stc demo`` data: phrases -> eSpeak NG speech -> manifest -> shards;
* :mod:`~engine.demo.teacher`: the 8-layer demo teacher's random init (``make demo-teacher`` trains it).
"""

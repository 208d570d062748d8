"""Generation: ``requests`` and events, ``config``, ``admission`` (checks before queueing), the ``scheduler``
(who joins at each step), ``sampling``, ``text_stream``, ``chunked_prefill`` and the ``engine`` loop.
"""

"""The kernel side of a mount: the pyfuse3 adapter and the daemon around it.

* :mod:`.ops`: ``FuseOps``, pyfuse3 ``Operations`` translated onto :class:`ttfs.vfs.ModelFs`
  (the only module that implements handlers, and with :mod:`.serve` the only importers of
  pyfuse3);
* :mod:`.serve`: ``serve()`` wires store → providers → fetcher → vfs → ops and runs the session;
* :mod:`.kernel`: sysfs tuning of readahead and background depth after mounting;
* :mod:`.daemon`: spawning a detached daemon, readiness, and unmounting (no pyfuse3).

Nothing is imported here eagerly, so ``ttfs mount``'s parent process and ``ttfs umount`` never
load pyfuse3.
"""

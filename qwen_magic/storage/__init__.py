"""Files: every one qwen_magic writes, and the history file the conversations live in.

* :mod:`~qwen_magic.storage.atomic`: writing a file or a folder so a crash never leaves half of it
  (the one helper every write goes through), and the one-line reasons for OS errors;
* :mod:`~qwen_magic.storage.codec`: the history file's JSON, to text and back, refusing what is
  not a qwen_magic conversation file;
* :mod:`~qwen_magic.storage.history`: the notebook's history file, saved after every turn,
  locked and merged when two kernels share it;
* :mod:`~qwen_magic.storage.export`: Markdown exports (``%qwen_export``);
* :mod:`~qwen_magic.storage.cache_dir`: where built things are cached (``$QWEN_MAGIC_CACHE``).

This layer knows files and conversations, never backends, cells or widgets.
"""

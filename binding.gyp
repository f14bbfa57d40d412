{
  "targets": [
    {
      "target_name": "pigeon_spawn",
      "sources": ["native/pigeon_spawn.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}

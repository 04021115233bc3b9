"""What every layer of the package uses and that knows nothing about models or merging: errors, atomic
storage and hashing, the name registry, the task-data containers, progress bars and the version."""

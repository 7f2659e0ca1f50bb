"""The Ray Serve applications: the image-generation service and the shared reward service."""

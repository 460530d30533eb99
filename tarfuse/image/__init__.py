"""The served image: which member, which format, and the map from image offsets to source offsets."""

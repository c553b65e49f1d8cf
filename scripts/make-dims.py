#!/usr/bin/env python3
"""Regenerate the sample dimension tables in data/dims/ (deterministic).

videos.csv:   video_id,title,channel_id,published_at   (ids match `tally produce`: vid-00000 ...)
channels.csv: channel_id,name
"""
import csv
import random
import sys
from datetime import datetime, timedelta, timezone

out = sys.argv[1] if len(sys.argv) > 1 else "data/dims"
rng = random.Random(20261101)
channels = [
    "Northwind Kitchen", "Orbit Science", "Pixel Forge", "Trailhead Outdoors", "Bassline Studio",
    "Quiet Garden", "Second Serve Tennis", "Byte Sized Code", "Atlas Travel", "Studio Clay",
    "Midnight Cinema", "Little Lab", "Open Road Cycling", "Paper Planes", "Harbor News",
    "Coastline Surf", "Copper Pot", "Field Notes", "Echo Chamber Music", "Summit Fitness",
]
topics = ["Episode", "Live", "Tutorial", "Review", "Behind the Scenes", "Highlights", "Q&A", "Deep Dive", "Short", "Vlog"]
with open(f"{out}/channels.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["channel_id", "name"])
    for i, name in enumerate(channels):
        w.writerow([f"ch-{i:03d}", name])
start = datetime(2025, 1, 1, tzinfo=timezone.utc)
with open(f"{out}/videos.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["video_id", "title", "channel_id", "published_at"])
    for i in range(500):
        ch = rng.randrange(len(channels))
        title = f"{channels[ch]}: {rng.choice(topics)} {rng.randint(1, 250)}"
        published = start + timedelta(seconds=rng.randrange(0, 680 * 86400))
        w.writerow([f"vid-{i:05d}", title, f"ch-{ch:03d}", published.strftime("%Y-%m-%dT%H:%M:%SZ")])

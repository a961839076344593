"""Median and min–max spread of repeated runs."""
import statistics


def summarize(values):
    """{"median", "min", "max", "runs"} of the numbers (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}

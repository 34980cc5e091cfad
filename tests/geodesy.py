"""An independent reference for the GSD tests: GDAL's coordinate transform + Vincenty's inverse formula.

The code under test uses pyproj (PROJ) and GeographicLib (pyproj.Geod); this module uses neither, so a
bug in how we call them cannot hide in both.
"""

from __future__ import annotations

import math

import numpy as np
from rasterio.warp import transform as gdal_transform

_A = 6378137.0
_F = 1 / 298.257223563
_B = _A * (1 - _F)


def vincenty_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Distance on the WGS84 ellipsoid (Vincenty 1975), metres; converges for non-antipodal points."""
    u1 = math.atan((1 - _F) * math.tan(math.radians(lat1)))
    u2 = math.atan((1 - _F) * math.tan(math.radians(lat2)))
    big_l = math.radians(lon2 - lon1)
    lam = big_l
    sin_u1, cos_u1, sin_u2, cos_u2 = math.sin(u1), math.cos(u1), math.sin(u2), math.cos(u2)
    for _ in range(200):
        sin_lam, cos_lam = math.sin(lam), math.cos(lam)
        sin_sigma = math.hypot(cos_u2 * sin_lam, cos_u1 * sin_u2 - sin_u1 * cos_u2 * cos_lam)
        if sin_sigma == 0:
            return 0.0
        cos_sigma = sin_u1 * sin_u2 + cos_u1 * cos_u2 * cos_lam
        sigma = math.atan2(sin_sigma, cos_sigma)
        sin_alpha = cos_u1 * cos_u2 * sin_lam / sin_sigma
        cos2_alpha = 1 - sin_alpha**2
        cos_2sm = cos_sigma - 2 * sin_u1 * sin_u2 / cos2_alpha if cos2_alpha else 0.0
        c = _F / 16 * cos2_alpha * (4 + _F * (4 - 3 * cos2_alpha))
        prev = lam
        lam = big_l + (1 - c) * _F * sin_alpha * (
            sigma + c * sin_sigma * (cos_2sm + c * cos_sigma * (-1 + 2 * cos_2sm**2)))
        if abs(lam - prev) < 1e-13:
            break
    u_sq = cos2_alpha * (_A**2 - _B**2) / _B**2
    a = 1 + u_sq / 16384 * (4096 + u_sq * (-768 + u_sq * (320 - 175 * u_sq)))
    b = u_sq / 1024 * (256 + u_sq * (-128 + u_sq * (74 - 47 * u_sq)))
    d_sigma = b * sin_sigma * (cos_2sm + b / 4 * (cos_sigma * (-1 + 2 * cos_2sm**2) - b / 6 * cos_2sm * (
        -3 + 4 * sin_sigma**2) * (-3 + 4 * cos_2sm**2)))
    return _B * a * (sigma - d_sigma)


def pixel_to_lonlat_gdal(transform, crs, cols, rows):
    """Pixel points to lon/lat through GDAL/OGR (rasterio.warp.transform), not pyproj."""
    xs = [transform.a * c + transform.b * r + transform.c for c, r in zip(cols, rows, strict=True)]
    ys = [transform.d * c + transform.e * r + transform.f for c, r in zip(cols, rows, strict=True)]
    lon, lat = gdal_transform(crs, "EPSG:4326", xs, ys)
    return np.asarray(lon), np.asarray(lat)


def reference_gsd(transform, crs, col: float, row: float, factor: float) -> tuple[float, float]:
    """Ground size (x, y) in metres of a `factor`-wide pixel centred at scene pixel (col, row)."""
    h = factor / 2.0
    lon, lat = pixel_to_lonlat_gdal(transform, crs, [col - h, col + h, col, col], [row, row, row - h, row + h])
    return vincenty_m(lon[0], lat[0], lon[1], lat[1]), vincenty_m(lon[2], lat[2], lon[3], lat[3])

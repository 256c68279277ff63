"""Explicit Runge-Kutta methods as Butcher tableaus (data only).

A tableau with ``S`` stages holds nodes ``c`` (S,), the strictly lower triangular matrix ``a``
(S, S), solution weights ``b`` (S,), for adaptive methods the error weights
``b_error = b - b_embedded`` (S,) and the midpoint dense-output weights ``b_mid`` (S,), with
``y(t0 + dt/2) ~= y0 + dt * sum_j b_mid[j] * k_j``. Stage 0 is always ``f(t0, y0)``.

``order`` is the number torchdiffeq uses in its step-size controller (exponent ``1/order``)
and, minus one, in its initial step selection; it is kept equal so that step sequences match.
Every tableau is checked on construction (row sums equal ``c``, weights sum to one, error
weights sum to zero); the convergence orders are checked in the tests.
"""

from dataclasses import dataclass

__all__ = [
    "ButcherTableau",
    "DOPRI5",
    "DOPRI8",
    "TSIT5",
    "BOSH3",
    "FEHLBERG2",
    "ADAPTIVE_HEUN",
    "EULER",
    "MIDPOINT",
    "HEUN2",
    "HEUN3",
    "RK4",
    "ADAPTIVE_TABLEAUS",
    "FIXED_TABLEAUS",
]

_CHECK_TOL = 1e-9


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method; see the module docstring for the fields."""

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    b_error: tuple = None
    b_mid: tuple = None

    def __post_init__(self):
        stages = len(self.c)
        require(len(self.a) == stages, f"{self.name}: a must have {stages} rows")
        require(len(self.b) == stages, f"{self.name}: b must have {stages} entries")
        require(self.c[0] == 0, f"{self.name}: the first node must be 0")
        for i, row in enumerate(self.a):
            require(len(row) == i, f"{self.name}: row {i} of a must have {i} entries")
            require(abs(sum(row) - self.c[i]) < _CHECK_TOL, f"{self.name}: row {i} of a does not sum to c[{i}]")
        require(abs(sum(self.b) - 1) < _CHECK_TOL, f"{self.name}: b does not sum to 1")
        if self.b_error is not None:
            require(len(self.b_error) == stages, f"{self.name}: b_error must have {stages} entries")
            require(abs(sum(self.b_error)) < _CHECK_TOL, f"{self.name}: b_error does not sum to 0")
        if self.b_mid is not None:
            require(len(self.b_mid) == stages, f"{self.name}: b_mid must have {stages} entries")

    @property
    def stages(self):
        return len(self.c)

    @property
    def adaptive(self):
        return self.b_error is not None

    @property
    def fsal(self):
        """True when the last stage is evaluated at (t1, y1), so it is the next step's first stage."""
        return self.c[-1] == 1 and self.b[-1] == 0 and tuple(self.a[-1]) == tuple(self.b[:-1])


def require(condition, message):
    """Raise ValueError(message) unless ``condition`` (tableau checks)."""
    if not condition:
        raise ValueError(message)


def _lower(*rows):
    """Strictly lower triangular ``a`` from its non-empty rows (stage 0 has none)."""
    return ((),) + tuple(tuple(float(x) for x in row) for row in rows)


def _floats(*values):
    return tuple(float(x) for x in values)


# Dormand & Prince (1980) 5(4) with Shampine's dense output at the midpoint.
DOPRI5 = ButcherTableau(
    name="dopri5",
    order=5,
    c=_floats(0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1),
    a=_lower(
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ),
    b=_floats(35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
    # The embedded fourth-order weights are the ones torchdiffeq uses (not DP's 5179/57600 set),
    # so that accepted steps match.
    b_error=_floats(
        35 / 384 - 1951 / 21600,
        0,
        500 / 1113 - 22642 / 50085,
        125 / 192 - 451 / 720,
        -2187 / 6784 + 12231 / 42400,
        11 / 84 - 649 / 6300,
        -1 / 60,
    ),
    b_mid=_floats(
        6025192743 / 30085553152 / 2,
        0,
        51252292925 / 65400821598 / 2,
        -2691868925 / 45128329728 / 2,
        187940372067 / 1594534317056 / 2,
        -1776094331 / 19743644256 / 2,
        11237099 / 235043384 / 2,
    ),
)


def _tsit5_dense(theta):
    """Tsitouras (2011) continuous-extension weights b_i(theta), i = 1..7."""
    t = theta
    return _floats(
        -1.0530884977290216 * t * (t - 1.3299890189751412) * (t * t - 1.4364028541716351 * t + 0.7139816917074209),
        0.1017 * t * t * (t * t - 2.1966568338249754 * t + 1.2949852507374631),
        2.490627285651252793 * t * t * (t * t - 2.38535645472061657 * t + 1.57803468208092486),
        -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t * t,
        47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t * t,
        -34.87065786149660974 * (t - 1.2) * (t - 2 / 3) * t * t,
        2.5 * (t - 1) * (t - 0.6) * t * t,
    )


# Tsitouras (2011) 5(4). The propagated solution is the fifth-order one (FSAL).
TSIT5 = ButcherTableau(
    name="tsit5",
    order=5,
    c=_floats(0, 0.161, 0.327, 0.9,
              0.9800255409045096857298102862870245954942137979563024768854764293221195950761, 1, 1),
    a=_lower(
        [0.161],
        [-0.008480655492356988544426874250230774675121177393430391537369234245294192976164,
         0.335480655492356988544426874250230774675121177393430391537369234245294192976164],
        [2.897153057105493432130432594192938764924887287701866490314866693455023795137503,
         -6.359448489975074843148159912383825625952700647415626703305928850207288721235210,
         4.362295432869581411017727318190886861027813359713760212991062156752264926097707],
        [5.325864828439256604428877920840511317836476253097040101202360397727981648835607,
         -11.74888356406282787774717033978577296188744178259862899288666928009020615663593,
         7.495539342889836208304604784564358155658679161518186721010132816213648793440552,
         -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389],
        [5.861455442946420028659251486982647890394337666164814434818157239052507339770711,
         -12.92096931784710929170611868178335939541780751955743459166312250439928519268343,
         8.159367898576158643180400794539253485181918321135053305748355423955009222648673,
         -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777,
         -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579],
        [0.09646076681806522951816731316512876333711995238157997181903319145764851595234062,
         0.01,
         0.4798896504144995747752495322905965199130404621990332488332634944254542060153074,
         1.379008574103741893192274821856872770756462643091360525934940067397245698027561,
         -3.290069515436080679901047585711363850115683290894936158531296799594813811049925,
         2.324710524099773982415355918398765796109060233222962411944060046314465391054716],
    ),
    b=_floats(
        0.09646076681806522951816731316512876333711995238157997181903319145764851595234062,
        0.01,
        0.4798896504144995747752495322905965199130404621990332488332634944254542060153074,
        1.379008574103741893192274821856872770756462643091360525934940067397245698027561,
        -3.290069515436080679901047585711363850115683290894936158531296799594813811049925,
        2.324710524099773982415355918398765796109060233222962411944060046314465391054716,
        0,
    ),
    b_error=_floats(
        -0.001780011052225771443378550607539534775944678804333659557637450799792588061629796,
        -0.0008164344596567469032236360633546862401862537590159047610940604670770447527463931,
        0.007880878010261996010314727672526304238628733777103128603258129604952959142646516,
        -0.1447110071732629075371651479726351167209227123431676776195142338967608196495150,
        0.5823571654525552250199376106520421794260781239567387797673045438803694038950012,
        -0.4580821059291869466616365188325542974428047279788398179474684434732070620889539,
        1 / 66,
    ),
    b_mid=_tsit5_dense(0.5),
)

BOSH3 = ButcherTableau(
    name="bosh3",
    order=3,
    c=_floats(0, 1 / 2, 3 / 4, 1),
    a=_lower([1 / 2], [0, 3 / 4], [2 / 9, 1 / 3, 4 / 9]),
    b=_floats(2 / 9, 1 / 3, 4 / 9, 0),
    b_error=_floats(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    b_mid=_floats(0, 1 / 2, 0, 0),
)

# Runge-Kutta-Fehlberg 1(2) as torchdiffeq uses it: the propagated solution is the second
# order one and the third stage (evaluated at the first-order solution) is reused as the next
# step's first stage.
FEHLBERG2 = ButcherTableau(
    name="fehlberg2",
    order=2,
    c=_floats(0, 1 / 2, 1),
    a=_lower([1 / 2], [1 / 256, 255 / 256]),
    b=_floats(1 / 512, 255 / 256, 1 / 512),
    b_error=_floats(-1 / 512, 0, 1 / 512),
    b_mid=_floats(0, 1 / 2, 0),
)

# Heun-Euler 2(1) as torchdiffeq uses it (the Euler stage is reused as the next first stage).
ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun",
    order=2,
    c=_floats(0, 1),
    a=_lower([1]),
    b=_floats(1 / 2, 1 / 2),
    b_error=_floats(1 / 2, -1 / 2),
    b_mid=_floats(1 / 2, 0),
)


def _dopri8_dense_weight(coefficients, theta):
    """theta * polynomial(theta) with coefficients of theta^5 .. theta^0."""
    return theta * sum(coef * theta ** power for coef, power in zip(coefficients, range(5, -1, -1)))


_DOPRI8_DENSE = {
    0: (-6.3448349392860401388, 22.1396504998094068976, -30.0610568289666450593, 19.9990069333683970610,
        -6.6910181737837595697, 1.0),
    5: (-39.6107919852202505218, 116.4422149550342161651, -121.4999627731334642623, 52.2273532792945524050,
        -7.6142658045872677172, 0.0),
    6: (20.3761213808791436958, -67.1451318825957197185, 83.1721004639847717481, -46.8919164181093621583,
        10.7281392630428866124, 0.0),
    7: (7.3347098826795362023, -16.5672243527496524646, 9.5724507555993664382, -0.1890893225010595467,
        0.5526637063753648783, 0.0),
    8: (32.8801774352459155182, -89.9916014847245016028, 87.8406057677205645007, -35.7075975946222072821,
        4.2186562625665153803, 0.0),
    9: (-10.1588990526426760954, 22.6237489648532849093, -17.4152107770762969005, 6.2736448083240352160,
        -0.6627209125361597559, 0.0),
    10: (-12.5401268098782561200, 32.2362340167355370113, -28.5903289514790976966, 10.3160881272450748458,
         -1.2636789001135462218, 0.0),
    11: (29.5553001484516038033, -82.1020315488359848644, 81.6630950584341412934, -34.7650769866611817349,
         5.4106037898590422230, 0.0),
    12: (-41.7923486424390588923, 116.2662185791119533462, -114.9375291377009418170, 47.7457971078225540396,
         -7.0321379067945741781, 0.0),
    13: (20.3006925822100825485, -53.9020777466385396792, 50.2558364226176017553, -19.0082099341608028453,
         2.3537586759714983486, 0.0),
}

_DOPRI8_B = _floats(
    14005451 / 335480064, 0, 0, 0, 0, -59238493 / 1068277825, 181606767 / 758867731, 561292985 / 797845732,
    -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087, -528747749 / 2220607170, 1 / 4, 0,
)
_DOPRI8_B_EMBEDDED = _floats(
    13451932 / 455176623, 0, 0, 0, 0, -808719846 / 976000145, 1757004468 / 5645159321, 656045339 / 265891186,
    -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719, 2 / 45, 0, 0,
)

# Prince & Dormand (1981) 8(7) "RK8(7)13M" with the dense output used by torchdiffeq.
DOPRI8 = ButcherTableau(
    name="dopri8",
    order=8,
    c=_floats(0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
              1201146811 / 1299019798, 1, 1, 1),
    a=_lower(
        [1 / 18],
        [1 / 48, 1 / 16],
        [1 / 32, 0, 3 / 32],
        [5 / 16, 0, -75 / 64, 75 / 64],
        [3 / 80, 0, 0, 3 / 16, 3 / 20],
        [29443841 / 614563906, 0, 0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000],
        [16016141 / 946692911, 0, 0, 61564180 / 158732637, 22789713 / 633445777, 545815736 / 2771057229,
         -180193667 / 1043307555],
        [39632708 / 573591083, 0, 0, -433636366 / 683701615, -421739975 / 2616292301, 100302831 / 723423059,
         790204164 / 839813087, 800635310 / 3783071287],
        [246121993 / 1340847787, 0, 0, -37695042795 / 15268766246, -309121744 / 1061227803,
         -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457, 123872331 / 1001029789],
        [-1028468189 / 846180014, 0, 0, 8478235783 / 508512852, 1311729495 / 1432422823,
         -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
         -45442868181 / 3398467696, 3065993473 / 597172653],
        [185892177 / 718116043, 0, 0, -3185094517 / 667107341, -477755414 / 1098053517, -703635378 / 230739211,
         5731566787 / 1027545527, 5232866602 / 850066563, -4093664535 / 808688257, 3962137247 / 1805957418,
         65686358 / 487910083],
        [403863854 / 491063109, 0, 0, -5068492393 / 434740067, -411421997 / 543043805, 652783627 / 914296604,
         11173962825 / 925320556, -13158990841 / 6184727034, 3936647629 / 1978049680, -160528059 / 685178525,
         248638103 / 1413531060, 0],
        _DOPRI8_B[:13],
    ),
    b=_DOPRI8_B,
    b_error=tuple(x - y for x, y in zip(_DOPRI8_B, _DOPRI8_B_EMBEDDED)),
    b_mid=tuple(_dopri8_dense_weight(_DOPRI8_DENSE[i], 0.5) if i in _DOPRI8_DENSE else 0.0 for i in range(14)),
)

EULER = ButcherTableau(name="euler", order=1, c=(0.0,), a=((),), b=(1.0,))
MIDPOINT = ButcherTableau(name="midpoint", order=2, c=_floats(0, 1 / 2), a=_lower([1 / 2]), b=_floats(0, 1))
HEUN2 = ButcherTableau(name="heun2", order=2, c=_floats(0, 1), a=_lower([1]), b=_floats(1 / 2, 1 / 2))
HEUN3 = ButcherTableau(
    name="heun3", order=3, c=_floats(0, 1 / 3, 2 / 3), a=_lower([1 / 3], [0, 2 / 3]), b=_floats(1 / 4, 0, 3 / 4)
)
# torchdiffeq's "rk4" is Kutta's 3/8 rule.
RK4 = ButcherTableau(
    name="rk4",
    order=4,
    c=_floats(0, 1 / 3, 2 / 3, 1),
    a=_lower([1 / 3], [-1 / 3, 1], [1, -1, 1]),
    b=_floats(1 / 8, 3 / 8, 3 / 8, 1 / 8),
)

ADAPTIVE_TABLEAUS = {t.name: t for t in (DOPRI8, DOPRI5, TSIT5, BOSH3, FEHLBERG2, ADAPTIVE_HEUN)}
FIXED_TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4)}

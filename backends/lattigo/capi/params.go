package main

/*
#include <stdlib.h>
*/
import "C"

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"math/big"

	"github.com/tuneinsight/lattigo/v6/circuits/ckks/bootstrapping"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
	"github.com/tuneinsight/lattigo/v6/utils"
)

// SecretLiteral: the secret distribution.  H > 0: ternary with exactly H
// non-zero coefficients (sparse, or "dense" with H = N/2 as in Lattigo's
// N15QP880H16384H32); otherwise P = probability of a non-zero coefficient
// (Lattigo's default dense ternary is P = 2/3).
type SecretLiteral struct {
	H int     `json:"h,omitempty"`
	P float64 `json:"p,omitempty"`
}

// BootstrapLiteral mirrors the optional fields of Lattigo's
// bootstrapping.ParametersLiteral (nil = Lattigo's default).  The ring degree
// and the slot count are those of the residual parameters.
type BootstrapLiteral struct {
	LogP            []int   `json:"log_p,omitempty"`
	EphemeralH      *int    `json:"ephemeral_h,omitempty"`
	LogMessageRatio *int    `json:"log_message_ratio,omitempty"`
	CtSLogScales    [][]int `json:"cts_log_scales,omitempty"`
	StCLogScales    [][]int `json:"stc_log_scales,omitempty"`
	EvalModLogScale *int    `json:"evalmod_log_scale,omitempty"`
	K               *int    `json:"k,omitempty"`
	Mod1Degree      *int    `json:"mod1_degree,omitempty"`
	DoubleAngle     *int    `json:"double_angle,omitempty"`
	Mod1InvDegree   *int    `json:"mod1_inv_degree,omitempty"`
}

// ParamsLiteral is the JSON literal Python hands over.
type ParamsLiteral struct {
	Name            string            `json:"name,omitempty"`
	LogN            int               `json:"log_n"`
	Q               []uint64          `json:"q,omitempty"`
	LogQ            []int             `json:"log_q,omitempty"`
	P               []uint64          `json:"p,omitempty"`
	LogP            []int             `json:"log_p,omitempty"`
	Secret          SecretLiteral     `json:"secret"`
	LogDefaultScale int               `json:"log_default_scale"`
	LogSlots        *int              `json:"log_slots,omitempty"`
	Insecure        bool              `json:"insecure,omitempty"`
	Bootstrap       *BootstrapLiteral `json:"bootstrap,omitempty"`
}

// Params is a checked parameter set (handle kind "parameter set").
type Params struct {
	lit         ParamsLiteral // resolved: Q and P explicit
	ckks        ckks.Parameters
	btp         *bootstrapping.Parameters
	logSlots    int
	fingerprint [32]byte
}

func (p *Params) slots() int { return 1 << p.logSlots }

func (p *Params) sameAs(o *Params) bool { return p == o || p.fingerprint == o.fingerprint }

func isPrime(q uint64) bool { return new(big.Int).SetUint64(q).ProbablyPrime(20) }

func checkPrimes(what string, ps []uint64, twoN uint64, seen map[uint64]string) error {
	for i, q := range ps {
		name := fmt.Sprintf("%s[%d]=%d", what, i, q)
		if q < 3 || q >= 1<<61 {
			return fmt.Errorf("%s: primes must be in [3, 2^61)", name)
		}
		if q%twoN != 1 {
			return fmt.Errorf("%s is not 1 mod 2N=%d (not NTT-friendly for this ring)", name, twoN)
		}
		if !isPrime(q) {
			return fmt.Errorf("%s is not prime", name)
		}
		if prev, ok := seen[q]; ok {
			return fmt.Errorf("%s repeats %s", name, prev)
		}
		seen[q] = name
	}
	return nil
}

func xsOf(s SecretLiteral, logN int) (ring.DistributionParameters, error) {
	switch {
	case s.H > 0 && s.P > 0:
		return nil, fmt.Errorf("secret: give either h (Hamming weight) or p (density), not both")
	case s.H > 0:
		if s.H > 1<<logN {
			return nil, fmt.Errorf("secret.h=%d exceeds the ring degree %d", s.H, 1<<logN)
		}
		return ring.Ternary{H: s.H}, nil
	case s.P > 0:
		if s.P > 1 {
			return nil, fmt.Errorf("secret.p=%g must be in (0, 1]", s.P)
		}
		return ring.Ternary{P: s.P}, nil
	}
	return nil, fmt.Errorf("secret: give h (Hamming weight) or p (density of non-zero coefficients, 2/3 = Lattigo's dense default)")
}

func newParams(lit ParamsLiteral) (*Params, error) {
	if lit.LogN < 4 || lit.LogN > 17 {
		return nil, fmt.Errorf("log_n=%d: must be in [4, 17]", lit.LogN)
	}
	if (len(lit.Q) == 0) == (len(lit.LogQ) == 0) {
		return nil, fmt.Errorf("give exactly one of q (explicit primes) and log_q (prime sizes)")
	}
	if (len(lit.P) == 0) == (len(lit.LogP) == 0) {
		return nil, fmt.Errorf("give exactly one of p (explicit primes) and log_p (prime sizes)")
	}
	if lit.LogDefaultScale < 1 || lit.LogDefaultScale > 60 {
		return nil, fmt.Errorf("log_default_scale=%d: must be in [1, 60] (one prime per rescale)", lit.LogDefaultScale)
	}
	twoN := uint64(2) << lit.LogN
	seen := map[uint64]string{}
	if err := checkPrimes("q", lit.Q, twoN, seen); err != nil {
		return nil, err
	}
	if err := checkPrimes("p", lit.P, twoN, seen); err != nil {
		return nil, err
	}
	xs, err := xsOf(lit.Secret, lit.LogN)
	if err != nil {
		return nil, err
	}
	cl := ckks.ParametersLiteral{
		LogN: lit.LogN, Q: lit.Q, P: lit.P, LogQ: lit.LogQ, LogP: lit.LogP,
		Xs: xs, LogDefaultScale: lit.LogDefaultScale,
	}
	cp, err := ckks.NewParametersFromLiteral(cl)
	if err != nil {
		return nil, err
	}
	if cp.LevelsConsumedPerRescaling() != 1 {
		return nil, fmt.Errorf("log_default_scale=%d needs two primes per rescale; not supported", lit.LogDefaultScale)
	}
	res := &Params{ckks: cp, logSlots: cp.LogMaxSlots()}
	if lit.LogSlots != nil {
		if *lit.LogSlots < 1 || *lit.LogSlots > cp.LogMaxSlots() {
			return nil, fmt.Errorf("log_slots=%d: must be in [1, %d]", *lit.LogSlots, cp.LogMaxSlots())
		}
		res.logSlots = *lit.LogSlots
	}
	// resolved literal: explicit primes
	lit.Q, lit.LogQ = append([]uint64(nil), cp.Q()...), nil
	lit.P, lit.LogP = append([]uint64(nil), cp.P()...), nil
	ls := res.logSlots
	lit.LogSlots = &ls
	res.lit = lit

	if b := lit.Bootstrap; b != nil {
		bl := bootstrapping.ParametersLiteral{
			LogN:                  utils.Pointy(lit.LogN),
			LogSlots:              utils.Pointy(res.logSlots),
			LogP:                  b.LogP,
			EphemeralSecretWeight: b.EphemeralH,
			LogMessageRatio:       b.LogMessageRatio,
			CoeffsToSlotsFactorizationDepthAndLogScales: b.CtSLogScales,
			SlotsToCoeffsFactorizationDepthAndLogScales: b.StCLogScales,
			EvalModLogScale: b.EvalModLogScale,
			K:               b.K,
			Mod1Degree:      b.Mod1Degree,
			DoubleAngle:     b.DoubleAngle,
			Mod1InvDegree:   b.Mod1InvDegree,
			Xs:              xs,
		}
		bp, err := bootstrapping.NewParametersFromLiteral(cp, bl)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
		res.btp = &bp
	}

	// fingerprint: the resolved literal plus the bootstrapping chain
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	if err := enc.Encode(lit); err != nil {
		return nil, err
	}
	if res.btp != nil {
		if err := enc.Encode([2][]uint64{res.btp.BootstrappingParameters.Q(), res.btp.BootstrappingParameters.P()}); err != nil {
			return nil, err
		}
	}
	res.fingerprint = sha256.Sum256(buf.Bytes())
	return res, nil
}

func parseLiteral(js string) (ParamsLiteral, error) {
	var lit ParamsLiteral
	dec := json.NewDecoder(bytes.NewReader([]byte(js)))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	if err := dec.Decode(&lit); err != nil {
		return lit, fmt.Errorf("parameter literal: %w", err)
	}
	return lit, nil
}

//export hl_params_new
func hl_params_new(js *C.char, out *C.longlong) *C.char {
	return guard("params", func() error {
		lit, err := parseLiteral(C.GoString(js))
		if err != nil {
			return err
		}
		p, err := newParams(lit)
		if err != nil {
			return err
		}
		*out = C.longlong(put(p))
		return nil
	})
}

func bitsOf(ps []uint64) []float64 {
	out := make([]float64, len(ps))
	for i, q := range ps {
		out[i] = math.Log2(float64(q))
	}
	return out
}

// paramsInfo is what Python's LattigoParams exposes.
func paramsInfo(p *Params) map[string]any {
	cp := p.ckks
	info := map[string]any{
		"literal":          p.lit,
		"log_n":            cp.LogN(),
		"n":                cp.N(),
		"log_slots":        p.logSlots,
		"slots":            p.slots(),
		"max_level":        cp.MaxLevel(),
		"q":                cp.Q(),
		"p":                cp.P(),
		"log2_q":           bitsOf(cp.Q()),
		"log2_p":           bitsOf(cp.P()),
		"default_scale":    cp.DefaultScale().Float64(),
		"log_qp":           cp.LogQP(),
		"log_q":            cp.LogQ(),
		"secret":           p.lit.Secret,
		"fingerprint":      hex.EncodeToString(p.fingerprint[:]),
		"galois_generator": 5,
	}
	if b := p.btp; b != nil {
		bp := b.BootstrappingParameters
		msgRatio := math.Exp2(float64(b.Mod1ParametersLiteral.LogMessageRatio))
		sStar, _ := btpTargetScale(p)
		s0, _ := sStar.Float64()
		info["bootstrap"] = map[string]any{
			"output_level":      cp.MaxLevel(),
			"depth":             bp.MaxLevel() - cp.MaxLevel(),
			"cts_depth":         b.CoeffsToSlotsParameters.Depth(true),
			"evalmod_depth":     b.Mod1ParametersLiteral.Depth(),
			"stc_depth":         b.SlotsToCoeffsParameters.Depth(true),
			"q":                 bp.Q(),
			"p":                 bp.P(),
			"log2_q":            bitsOf(bp.Q()),
			"log2_p":            bitsOf(bp.P()),
			"log_qp":            bp.LogQP(),
			"log_slots":         b.LogMaxSlots(),
			"ephemeral_h":       b.EphemeralSecretWeight,
			"log_message_ratio": b.Mod1ParametersLiteral.LogMessageRatio,
			"message_ratio":     msgRatio,
			"k":                 b.Mod1ParametersLiteral.K,
			"mod1_degree":       b.Mod1ParametersLiteral.Mod1Degree,
			"double_angle":      b.Mod1ParametersLiteral.DoubleAngle,
			"mod1_inv_degree":   b.Mod1ParametersLiteral.Mod1InvDegree,
			"evalmod_log_scale": b.Mod1ParametersLiteral.LogScale,
			"galois_elements":   len(b.GaloisElements(bp)) + 1,
			// a level-0 input at this scale is bootstrapped without bias (see bootstrap.go)
			"level0_exact_scale": s0,
		}
	}
	return info
}

//export hl_params_info
func hl_params_info(h C.longlong, out **C.char) *C.char {
	return guard("params_info", func() error {
		p, err := lookup[*Params](h, "parameter set")
		if err != nil {
			return err
		}
		return cJSON(paramsInfo(p), out)
	})
}

// referenceLiteral converts one of Lattigo's default bootstrapping sets
// (circuits/ckks/bootstrapping/default_parameters.go) to our literal, with
// the residual primes generated by Lattigo (LogQ/LogP as Lattigo ships them).
func referenceLiteral(name string) (ParamsLiteral, error) {
	var sch ckks.ParametersLiteral
	var btp bootstrapping.ParametersLiteral
	switch name {
	case "n16-sparse": // N16QP1546H192H32
		sch, btp = bootstrapping.N16QP1546H192H32.SchemeParams, bootstrapping.N16QP1546H192H32.BootstrappingParams
	case "n15-dense": // N15QP880H16384H32
		sch, btp = bootstrapping.N15QP880H16384H32.SchemeParams, bootstrapping.N15QP880H16384H32.BootstrappingParams
		// v6.1.1 ships this set without a bootstrapping LogP, so Lattigo's default
		// (4 x 61 bits for 16 primes) makes its logQP 1012, above the 881 bits of
		// 128-bit security at N=2^15.  Its name (QP880) is reached with the residual
		// LogP {56, 56} for the bootstrapping key-switching primes too.
		if btp.LogP == nil {
			btp.LogP = []int{56, 56}
		}
	default:
		return ParamsLiteral{}, fmt.Errorf("unknown reference set %q (known: n16-sparse, n15-dense)", name)
	}
	cp, err := ckks.NewParametersFromLiteral(sch)
	if err != nil {
		return ParamsLiteral{}, err
	}
	h := 0
	if t, ok := sch.Xs.(ring.Ternary); ok {
		h = t.H
	}
	return ParamsLiteral{
		Name: name, LogN: sch.LogN,
		Q: append([]uint64(nil), cp.Q()...), P: append([]uint64(nil), cp.P()...),
		Secret: SecretLiteral{H: h}, LogDefaultScale: sch.LogDefaultScale,
		Bootstrap: &BootstrapLiteral{
			LogP: btp.LogP, EphemeralH: btp.EphemeralSecretWeight, LogMessageRatio: btp.LogMessageRatio,
			CtSLogScales:    btp.CoeffsToSlotsFactorizationDepthAndLogScales,
			StCLogScales:    btp.SlotsToCoeffsFactorizationDepthAndLogScales,
			EvalModLogScale: btp.EvalModLogScale, K: btp.K, Mod1Degree: btp.Mod1Degree,
			DoubleAngle: btp.DoubleAngle, Mod1InvDegree: btp.Mod1InvDegree,
		},
	}, nil
}

//export hl_reference_literal
func hl_reference_literal(name *C.char, out **C.char) *C.char {
	return guard("reference_literal", func() error {
		lit, err := referenceLiteral(C.GoString(name))
		if err != nil {
			return err
		}
		return cJSON(lit, out)
	})
}

package main

/*
#include <stdlib.h>
*/
import "C"

import (
	"fmt"
	"math"
	"math/big"
	"sync"
	"unsafe"

	"github.com/tuneinsight/lattigo/v6/circuits/ckks/bootstrapping"
	"github.com/tuneinsight/lattigo/v6/circuits/ckks/dft"
	"github.com/tuneinsight/lattigo/v6/circuits/ckks/mod1"
	"github.com/tuneinsight/lattigo/v6/circuits/ckks/polynomial"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
)

// Bootstrapping (Lattigo circuits/ckks/bootstrapping, same ring degree for the
// residual and the bootstrapping parameters).
//
// What Lattigo does with the input (Evaluator.ScaleDown): it drops primes
// while Q_l/scale stays >= q_l*ratio (ratio = 2^LogMessageRatio), multiplies
// by the integer R = round(Q_l/(scale*ratio)), and, above level 0, rescales
// towards the target scale Q_0/ratio; then ModUp, CoeffsToSlots, EvalMod
// (x mod 1 approximated around 0, so |value| must stay well below ratio) and
// SlotsToCoeffs.  The output is at the residual top level and its scale is SET
// to the default scale; the rounding of R is not corrected: at level 0 the
// output decrypts to e*m with e = scale*R*ratio/Q_0 (hl_bootstrap_bias).
//
// What we add:
//   - prepareInput: above level 0 we multiply by the integer
//     C = round(s* q_l / scale) and rescale once (exact integer product, one
//     prime), where s* = Q_0/(ratio*R*), R* = round(Q_0/(ratio*D)), is a scale
//     for which Lattigo's integer R is exactly R*; the output then decrypts to
//     m up to a relative 2^-40.  At level 0 the input goes to Lattigo as is.
//   - we call Evaluator.Evaluate, not Bootstrap (see bootstrapMany), and use
//     fixedShallowCopy for concurrent evaluators: two workarounds for v6.1.1.
//   - Lattigo modifies its input in place; we always pass a private copy.

func btpTargetScale(p *Params) (*big.Float, *big.Float) {
	q0 := new(big.Float).SetPrec(256).SetUint64(p.ckks.Q()[0])
	ratio := new(big.Float).SetPrec(256).SetFloat64(msgRatio(p))
	d := new(big.Float).SetPrec(256).SetFloat64(p.ckks.DefaultScale().Float64())
	// R* = round(Q0/(ratio*D)), s* = Q0/(ratio*R*)
	r := new(big.Float).SetPrec(256).Quo(q0, new(big.Float).SetPrec(256).Mul(ratio, d))
	ri, _ := new(big.Float).SetPrec(256).Add(r, big.NewFloat(0.5)).Int(nil)
	if ri.Sign() <= 0 {
		ri.SetInt64(1)
	}
	rf := new(big.Float).SetPrec(256).SetInt(ri)
	sStar := new(big.Float).SetPrec(256).Quo(q0, new(big.Float).SetPrec(256).Mul(ratio, rf))
	return sStar, rf
}

// levelZeroBias returns e - 1 for an input at level 0 with scale s.
func levelZeroBias(p *Params, s float64) (float64, error) {
	q0 := new(big.Float).SetPrec(256).SetUint64(p.ckks.Q()[0])
	ratio := new(big.Float).SetPrec(256).SetFloat64(msgRatio(p))
	sf := new(big.Float).SetPrec(256).SetFloat64(s)
	up := new(big.Float).SetPrec(256).Quo(q0, new(big.Float).SetPrec(256).Mul(sf, ratio))
	if up.Cmp(big.NewFloat(0.5)) < 0 {
		return 0, fmt.Errorf("input scale %v too large for bootstrapping at level 0: Q_0/scale = %.4g < ratio/2 = %g",
			s, new(big.Float).Quo(q0, sf), msgRatio(p)/2)
	}
	r, _ := new(big.Float).SetPrec(256).Add(up, big.NewFloat(0.5)).Int(nil)
	e := new(big.Float).SetPrec(256).Mul(sf, new(big.Float).SetInt(r))
	e.Mul(e, ratio)
	e.Quo(e, q0)
	e.Sub(e, big.NewFloat(1))
	f, _ := e.Float64()
	return f, nil
}

// prepareInput returns a private copy of ct ready for Lattigo's Bootstrap
// (Lattigo modifies its input in place).  Caller holds s.mu.
func (s *Session) prepareInput(ct *rlwe.Ciphertext) (*rlwe.Ciphertext, error) {
	if ct.LogDimensions.Cols != s.p.logSlots {
		return nil, fmt.Errorf("ciphertext has 2^%d slots, the bootstrapping 2^%d", ct.LogDimensions.Cols, s.p.logSlots)
	}
	l := ct.Level()
	if l == 0 {
		if _, err := levelZeroBias(s.p, scaleOf(ct)); err != nil {
			return nil, err
		}
		return ct.CopyNew(), nil
	}
	sStar, _ := btpTargetScale(s.p)
	ql := new(big.Float).SetPrec(256).SetUint64(s.p.ckks.Q()[l])
	c := new(big.Float).SetPrec(256).Mul(sStar, ql)
	c.Quo(c, new(big.Float).SetPrec(256).SetFloat64(scaleOf(ct)))
	ci, _ := c.Add(c, big.NewFloat(0.5)).Int(nil)
	if ci.BitLen() < 24 {
		return nil, fmt.Errorf("input scale %v at level %d is too large to bring to the bootstrapping scale with one prime "+
			"(factor %v); rescale first", scaleOf(ct), l, ci)
	}
	tmp := s.newCiphertext(l)
	if err := s.eval.Mul(ct, ci, tmp); err != nil {
		return nil, err
	}
	res := s.newCiphertext(l)
	if err := s.eval.Rescale(tmp, res); err != nil {
		return nil, err
	}
	res.Scale = rlwe.NewScale(sStar)
	return res, nil
}

// fixedShallowCopy works around Lattigo v6.1.1's bootstrapping
// Evaluator.ShallowCopy, which builds the DFT and polynomial evaluators of the
// copy with the residual parameters instead of the bootstrapping ones (so the
// copy fails on the first CoeffsToSlots above the residual levels).
func fixedShallowCopy(ev *bootstrapping.Evaluator) *bootstrapping.Evaluator {
	c := ev.ShallowCopy()
	params := ev.BootstrappingParameters
	c.DFTEvaluator = dft.NewEvaluator(params, c.Evaluator)
	c.Mod1Evaluator = mod1.NewEvaluator(c.Evaluator, polynomial.NewEvaluator(params, c.Evaluator), c.Mod1Parameters)
	return c
}

// btpEvaluators returns n evaluators (building the first one and the shallow
// copies on demand).  Caller holds s.btpMu.
func (s *Session) btpEvaluators(n int) ([]*bootstrapping.Evaluator, error) {
	if s.btpKeys == nil {
		if s.p.btp == nil {
			return nil, fmt.Errorf("the parameter set has no bootstrap literal")
		}
		return nil, fmt.Errorf("no bootstrap.key loaded in this key set")
	}
	if s.btpEval == nil {
		ev, err := bootstrapping.NewEvaluator(*s.p.btp, s.btpKeys)
		if err != nil {
			return nil, err
		}
		s.btpEval = ev
		s.btpPool = []*bootstrapping.Evaluator{ev}
	}
	for len(s.btpPool) < n {
		s.btpPool = append(s.btpPool, fixedShallowCopy(s.btpEval))
	}
	return s.btpPool[:n], nil
}

func (s *Session) finishOutput(out *rlwe.Ciphertext) error {
	if out.Level() < s.p.ckks.MaxLevel() {
		return fmt.Errorf("bootstrap returned level %d, expected %d", out.Level(), s.p.ckks.MaxLevel())
	}
	if out.Level() > s.p.ckks.MaxLevel() {
		out.Resize(out.Degree(), s.p.ckks.MaxLevel())
	}
	out.LogDimensions = ring.Dimensions{Rows: 0, Cols: s.p.logSlots}
	setScale(out.MetaData, s.p.ckks.DefaultScale().Float64())
	return nil
}

func bootstrapMany(sh C.longlong, hs []int64, workers int, outs []C.longlong) error {
	s, err := getSession(sh)
	if err != nil {
		return err
	}
	if s.client {
		return fmt.Errorf("needs the server's bootstrap keys; this is a client session")
	}
	if workers < 1 {
		workers = 1
	}
	if workers > len(hs) {
		workers = len(hs)
	}
	if s.p.btp == nil {
		return fmt.Errorf("the parameter set has no bootstrap literal")
	}
	if s.btpKeys == nil {
		return fmt.Errorf("no bootstrap.key loaded in this key set")
	}
	// inputs: checked and prepared under the evaluator lock (released even on a panic)
	ins := make([]*rlwe.Ciphertext, len(hs))
	if err := func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		for i, h := range hs {
			ct, err := s.ctArg(C.longlong(h), fmt.Sprintf("ciphertext %d", i))
			if err != nil {
				return err
			}
			if ins[i], err = s.prepareInput(ct); err != nil {
				return fmt.Errorf("ciphertext %d: %w", i, err)
			}
		}
		return nil
	}(); err != nil {
		return err
	}

	s.btpMu.Lock()
	defer s.btpMu.Unlock()
	evs, err := s.btpEvaluators(workers)
	if err != nil {
		return err
	}
	res := make([]*rlwe.Ciphertext, len(hs))
	errs := make([]error, len(hs))
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(ev *bootstrapping.Evaluator) {
			defer wg.Done()
			for i := range jobs {
				func() {
					defer func() {
						if r := recover(); r != nil {
							errs[i] = fmt.Errorf("internal error: %v", r)
						}
					}()
					// Evaluate, not Bootstrap: v6.1.1's Bootstrap (BootstrapMany) runs
					// PackAndSwitchN1ToN2, which relabels a sparsely packed ciphertext
					// as fully packed when both rings are equal (its xPow2N2 is nil
					// then), so sparse-slot bootstraps decrypt to garbage.  For equal
					// ring degrees BootstrapMany is otherwise exactly Evaluate.
					res[i], errs[i] = ev.Evaluate(ins[i])
				}()
			}
		}(evs[w])
	}
	for i := range hs {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	for i := range hs {
		if errs[i] != nil {
			return fmt.Errorf("ciphertext %d: %w", i, errs[i])
		}
		if err := s.finishOutput(res[i]); err != nil {
			return err
		}
	}
	for i := range hs {
		outs[i] = C.longlong(put(&Ciphertext{p: s.p, ct: res[i]}))
	}
	return nil
}

//export hl_bootstrap
func hl_bootstrap(sh, ch C.longlong, out *C.longlong) *C.char {
	return guard("bootstrap", func() error {
		o := []C.longlong{0}
		if err := bootstrapMany(sh, []int64{int64(ch)}, 1, o); err != nil {
			return err
		}
		*out = o[0]
		return nil
	})
}

//export hl_bootstrap_many
func hl_bootstrap_many(sh C.longlong, chs *C.longlong, n C.longlong, workers C.int, outs *C.longlong) *C.char {
	return guard("bootstrap_many", func() error {
		hs := append([]int64(nil), int64s(chs, n)...)
		o := unsafe.Slice(outs, int(n))
		return bootstrapMany(sh, hs, int(workers), o)
	})
}

// hl_bootstrap_prepare builds the bootstrapping evaluator (and workers-1
// shallow copies) now instead of at the first bootstrap.
//
//export hl_bootstrap_prepare
func hl_bootstrap_prepare(sh C.longlong, workers C.int) *C.char {
	return guard("bootstrap_prepare", func() error {
		s, err := getSession(sh)
		if err != nil {
			return err
		}
		s.btpMu.Lock()
		defer s.btpMu.Unlock()
		_, err = s.btpEvaluators(int(workers))
		return err
	})
}

//export hl_bootstrap_bias
func hl_bootstrap_bias(ph C.longlong, level C.int, scale C.double, out *C.double) *C.char {
	return guard("bootstrap_bias", func() error {
		p, err := lookup[*Params](ph, "parameter set")
		if err != nil {
			return err
		}
		if p.btp == nil {
			return fmt.Errorf("the parameter set has no bootstrap literal")
		}
		if level > 0 {
			*out = 0
			return nil
		}
		b, err := levelZeroBias(p, float64(scale))
		*out = C.double(b)
		return err
	})
}

// msgRatio is Lattigo's message ratio 2^LogMessageRatio (mod1.Parameters.MessageRatio).
func msgRatio(p *Params) float64 {
	return math.Exp2(float64(p.btp.Mod1ParametersLiteral.LogMessageRatio))
}

package main

/*
#include <stdlib.h>
*/
import "C"

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/big"
	"os"
	"unsafe"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
	"github.com/tuneinsight/lattigo/v6/utils/buffer"
)

// Ciphertext (handle kind "ciphertext").  Its scale is always a float64
// value stored exactly in Lattigo's big.Float Scale.
type Ciphertext struct {
	p  *Params
	ct *rlwe.Ciphertext
}

// Plaintext (handle kind "plaintext"): an encoded vector at a level and scale.
type Plaintext struct {
	p  *Params
	pt *rlwe.Plaintext
}

func scaleOf(ct *rlwe.Ciphertext) float64 { return ct.Scale.Float64() }

func setScale(md *rlwe.MetaData, s float64) { md.Scale = rlwe.NewScale(s) }

// sameScale: equal up to one unit in the last place (as SEAL's are_close).
func sameScale(a, b float64) bool {
	return a == b || math.Abs(a-b) <= 0x1p-52*math.Max(math.Abs(a), math.Abs(b))
}

func checkScale(s float64, what string) error {
	if !(s >= 1) || math.IsInf(s, 0) {
		return fmt.Errorf("%s %v: must be a finite number >= 1", what, s)
	}
	return nil
}

func getSession(h C.longlong) (*Session, error) { return lookup[*Session](h, "key session") }

func (s *Session) ctArg(h C.longlong, name string) (*rlwe.Ciphertext, error) {
	c, err := lookup[*Ciphertext](h, "ciphertext")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if !c.p.sameAs(s.p) {
		return nil, fmt.Errorf("%s (handle %d) belongs to another parameter set", name, int64(h))
	}
	if c.ct.Degree() != 1 {
		return nil, fmt.Errorf("%s (handle %d) has degree %d, expected 1", name, int64(h), c.ct.Degree())
	}
	return c.ct, nil
}

func (s *Session) ptArg(h C.longlong) (*rlwe.Plaintext, error) {
	c, err := lookup[*Plaintext](h, "plaintext")
	if err != nil {
		return nil, err
	}
	if !c.p.sameAs(s.p) {
		return nil, fmt.Errorf("plaintext (handle %d) belongs to another parameter set", int64(h))
	}
	return c.pt, nil
}

func (s *Session) newCt(ct *rlwe.Ciphertext, out *C.longlong) {
	*out = C.longlong(put(&Ciphertext{p: s.p, ct: ct}))
}

func (s *Session) checkLevel(level int, what string) error {
	if level < 0 || level > s.p.ckks.MaxLevel() {
		return fmt.Errorf("%s %d out of range [0, %d]", what, level, s.p.ckks.MaxLevel())
	}
	return nil
}

// maxEncoders bounds the encoder copies kept for hl_encode (each holds buffers of a few MB;
// a sync.Pool would drop them at every garbage collection and make new ones)
const maxEncoders = 8

func (s *Session) setEncoder(e *ckks.Encoder) {
	s.encoder = e
	s.encoders = make(chan *slotEncoder, maxEncoders)
	s.fast = s.newSlotEncoder()
}

func (s *Session) getEncoder() *slotEncoder {
	select {
	case e := <-s.encoders:
		return e
	default:
		return s.newSlotEncoder()
	}
}

func (s *Session) putEncoder(e *slotEncoder) {
	select {
	case s.encoders <- e:
	default:
	}
}

// encode puts vals (at most slots values, zero padded) at level with exactly scale, with the
// session's encoder (callers hold mu).
func (s *Session) encode(vals []float64, level int, scale float64) (*rlwe.Plaintext, error) {
	return s.encodeWith(s.fast, vals, level, scale)
}

// encodeWith encodes with e (encodeFast), or with Lattigo's own Encoder.Encode when e is nil.
func (s *Session) encodeWith(e *slotEncoder, vals []float64, level int, scale float64) (*rlwe.Plaintext, error) {
	if err := s.checkLevel(level, "level"); err != nil {
		return nil, err
	}
	if err := checkScale(scale, "scale"); err != nil {
		return nil, err
	}
	if len(vals) > s.p.slots() {
		return nil, fmt.Errorf("%d values for %d slots", len(vals), s.p.slots())
	}
	for i, v := range vals {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, fmt.Errorf("value [%d] = %v is not finite", i, v)
		}
	}
	pt := ckks.NewPlaintext(s.p.ckks, level)
	setScale(pt.MetaData, scale)
	pt.LogDimensions = ring.Dimensions{Rows: 0, Cols: s.p.logSlots}
	var err error
	if e != nil {
		err = e.encodeFast(s.p.ckks, vals, pt)
	} else {
		err = s.encoder.Encode(vals, pt)
	}
	if err != nil {
		return nil, err
	}
	return pt, nil
}

func (s *Session) newCiphertext(level int) *rlwe.Ciphertext {
	ct := ckks.NewCiphertext(s.p.ckks, 1, level)
	ct.LogDimensions = ring.Dimensions{Rows: 0, Cols: s.p.logSlots}
	return ct
}

// op runs f with the session's evaluator lock held.
func sessionOp(op string, sh C.longlong, f func(s *Session) error) *C.char {
	return guard(op, func() error {
		s, err := getSession(sh)
		if err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		return f(s)
	})
}

func (s *Session) needServer(op string) error {
	if s.client {
		return fmt.Errorf("needs the server's evaluation keys; this is a client session")
	}
	return nil
}

// hl_encode needs no session lock: it encodes with an encoder of its own from the pool, so
// callers may encode on one thread while another evaluates.
//
//export hl_encode
func hl_encode(sh C.longlong, vals *C.double, n C.longlong, level C.int, scale C.double, out *C.longlong) *C.char {
	return guard("encode", func() error {
		s, err := getSession(sh)
		if err != nil {
			return err
		}
		enc := s.getEncoder()
		defer s.putEncoder(enc)
		pt, err := s.encodeWith(enc, float64s(vals, n), int(level), float64(scale))
		if err != nil {
			return err
		}
		*out = C.longlong(put(&Plaintext{p: s.p, pt: pt}))
		return nil
	})
}

//export hl_encrypt
func hl_encrypt(sh C.longlong, vals *C.double, n C.longlong, level C.int, scale C.double, useSecret C.int, out *C.longlong) *C.char {
	return sessionOp("encrypt", sh, func(s *Session) error {
		enc := s.encPk
		if useSecret != 0 {
			if s.encSk == nil {
				return fmt.Errorf("secret-key encryption needs a client session (the server has no secret key)")
			}
			enc = s.encSk
		}
		pt, err := s.encode(float64s(vals, n), int(level), float64(scale))
		if err != nil {
			return err
		}
		ct := s.newCiphertext(int(level))
		if err := enc.Encrypt(pt, ct); err != nil {
			return err
		}
		setScale(ct.MetaData, float64(scale))
		s.newCt(ct, out)
		return nil
	})
}

//export hl_decrypt
func hl_decrypt(sh C.longlong, ch C.longlong, vals *C.double, n C.longlong) *C.char {
	return sessionOp("decrypt", sh, func(s *Session) error {
		if s.dec == nil {
			return fmt.Errorf("needs the secret key (client session)")
		}
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		if int(n) != s.p.slots() {
			return fmt.Errorf("output buffer has %d entries for %d slots", int(n), s.p.slots())
		}
		if ct.LogDimensions.Cols != s.p.logSlots {
			return fmt.Errorf("ciphertext has 2^%d slots, parameters 2^%d", ct.LogDimensions.Cols, s.p.logSlots)
		}
		pt := s.dec.DecryptNew(ct)
		return s.encoder.Decode(pt, float64s(vals, n))
	})
}

//export hl_ct_info
func hl_ct_info(ch C.longlong, level *C.int, scale *C.double, degree *C.int) *C.char {
	return guard("ciphertext info", func() error {
		c, err := lookup[*Ciphertext](ch, "ciphertext")
		if err != nil {
			return err
		}
		*level = C.int(c.ct.Level())
		*scale = C.double(scaleOf(c.ct))
		*degree = C.int(c.ct.Degree())
		return nil
	})
}

//export hl_ct_set_scale
func hl_ct_set_scale(ch C.longlong, scale C.double) *C.char {
	return guard("set_scale", func() error {
		c, err := lookup[*Ciphertext](ch, "ciphertext")
		if err != nil {
			return err
		}
		if err := checkScale(float64(scale), "scale"); err != nil {
			return err
		}
		setScale(c.ct.MetaData, float64(scale))
		return nil
	})
}

//export hl_ct_copy
func hl_ct_copy(ch C.longlong, out *C.longlong) *C.char {
	return guard("copy", func() error {
		c, err := lookup[*Ciphertext](ch, "ciphertext")
		if err != nil {
			return err
		}
		*out = C.longlong(put(&Ciphertext{p: c.p, ct: c.ct.CopyNew()}))
		return nil
	})
}

//export hl_pt_info
func hl_pt_info(h C.longlong, level *C.int, scale *C.double) *C.char {
	return guard("plaintext info", func() error {
		c, err := lookup[*Plaintext](h, "plaintext")
		if err != nil {
			return err
		}
		*level = C.int(c.pt.Level())
		*scale = C.double(c.pt.Scale.Float64())
		return nil
	})
}

// ---------------------------------------------------------------- serialization
//
// A serialized ciphertext: header (kind "ct", params fingerprint, 32 zero
// bytes) | float64 scale (little endian) | Lattigo's Ciphertext.WriteTo.

func writeCt(w io.Writer, p *Params, ct *rlwe.Ciphertext) error {
	if _, err := w.Write(header(kindCipher, p, [32]byte{})); err != nil {
		return err
	}
	if err := binary.Write(w, binary.LittleEndian, scaleOf(ct)); err != nil {
		return err
	}
	_, err := ct.WriteTo(w)
	return err
}

func readCt(r io.Reader, p *Params, src string) (*rlwe.Ciphertext, error) {
	h := make([]byte, headerSize)
	if _, err := io.ReadFull(r, h); err != nil {
		return nil, fmt.Errorf("%s: truncated header", src)
	}
	if _, err := checkHeader(h, kindCipher, p, src); err != nil {
		return nil, err
	}
	var sc float64
	if err := binary.Read(r, binary.LittleEndian, &sc); err != nil {
		return nil, fmt.Errorf("%s: truncated", src)
	}
	ct := new(rlwe.Ciphertext)
	if _, err := ct.ReadFrom(r); err != nil {
		return nil, fmt.Errorf("%s: %w", src, err)
	}
	if ct.MetaData == nil || len(ct.Value) < 2 || len(ct.Value) > 3 {
		return nil, fmt.Errorf("%s: malformed ciphertext", src)
	}
	for _, v := range ct.Value {
		if v.N() != p.ckks.N() || v.Level() != ct.Level() {
			return nil, fmt.Errorf("%s: ciphertext ring does not match the parameters", src)
		}
	}
	if ct.Level() > p.ckks.MaxLevel() {
		return nil, fmt.Errorf("%s: level %d above the maximum %d", src, ct.Level(), p.ckks.MaxLevel())
	}
	if ct.LogDimensions.Cols != p.logSlots || !ct.IsNTT {
		return nil, fmt.Errorf("%s: ciphertext slots/format do not match the parameters", src)
	}
	if err := checkScale(sc, "scale"); err != nil {
		return nil, fmt.Errorf("%s: %w", src, err)
	}
	setScale(ct.MetaData, sc)
	return ct, nil
}

//export hl_ct_to_bytes
func hl_ct_to_bytes(ch C.longlong, out *unsafe.Pointer, n *C.longlong) *C.char {
	return guard("ciphertext to bytes", func() error {
		c, err := lookup[*Ciphertext](ch, "ciphertext")
		if err != nil {
			return err
		}
		size := headerSize + 8 + c.ct.BinarySize()
		p := C.malloc(C.size_t(size))
		if p == nil {
			return fmt.Errorf("out of memory")
		}
		buf := buffer.NewBuffer(unsafe.Slice((*byte)(p), size))
		if err := writeCt(buf, c.p, c.ct); err != nil {
			C.free(p)
			return err
		}
		if buf.Available() != 0 {
			C.free(p)
			return fmt.Errorf("serialized %d bytes, expected %d", size-buf.Available(), size)
		}
		*out = p
		*n = C.longlong(size)
		return nil
	})
}

//export hl_ct_from_bytes
func hl_ct_from_bytes(ph C.longlong, data unsafe.Pointer, n C.longlong, out *C.longlong) *C.char {
	return guard("ciphertext from bytes", func() error {
		p, err := lookup[*Params](ph, "parameter set")
		if err != nil {
			return err
		}
		b := unsafe.Slice((*byte)(data), int(n))
		ct, err := readCt(fullReader{bufio.NewReaderSize(bytes.NewReader(b), 1<<16)}, p, "bytes")
		if err != nil {
			return err
		}
		*out = C.longlong(put(&Ciphertext{p: p, ct: ct}))
		return nil
	})
}

//export hl_ct_save
func hl_ct_save(ch C.longlong, path *C.char) *C.char {
	return guard("save ciphertext", func() error {
		c, err := lookup[*Ciphertext](ch, "ciphertext")
		if err != nil {
			return err
		}
		_, err = writeAtomic(C.GoString(path), 0o644, func(w *bufio.Writer) error { return writeCt(w, c.p, c.ct) })
		return err
	})
}

//export hl_ct_load
func hl_ct_load(ph C.longlong, path *C.char, out *C.longlong) *C.char {
	return guard("load ciphertext", func() error {
		p, err := lookup[*Params](ph, "parameter set")
		if err != nil {
			return err
		}
		name := C.GoString(path)
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		ct, err := readCt(fullReader{bufio.NewReaderSize(f, 1<<20)}, p, name)
		if err != nil {
			return err
		}
		*out = C.longlong(put(&Ciphertext{p: p, ct: ct}))
		return nil
	})
}

// ---------------------------------------------------------------- evaluation

func (s *Session) normStep(k int64) int {
	n := int64(s.p.slots())
	return int(((k % n) + n) % n)
}

// needGalois: the key of step k reaches a ciphertext at level (Lattigo's gadget product with a
// key of fewer primes than the ciphertext gives a wrong result, not an error).
func (s *Session) needGalois(k, level int) error {
	el := s.p.ckks.GaloisElement(k)
	gk, err := s.evk.GetGaloisKey(el)
	if err != nil {
		return fmt.Errorf("no Galois key for a left rotation by %d (element %d); the key set has steps %v", k, el, s.steps)
	}
	if gk.LevelQ() < level {
		return fmt.Errorf("the Galois key of a left rotation by %d is made for level %d, the ciphertext is at level %d "+
			"(make the keys with the program that rotates)", k, gk.LevelQ(), level)
	}
	return nil
}

//export hl_rotate
func hl_rotate(sh, ch C.longlong, k C.longlong, out *C.longlong) *C.char {
	return sessionOp("rotate", sh, func(s *Session) error {
		if err := s.needServer("rotate"); err != nil {
			return err
		}
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		kk := s.normStep(int64(k))
		if kk == 0 {
			s.newCt(ct.CopyNew(), out)
			return nil
		}
		if err := s.needGalois(kk, ct.Level()); err != nil {
			return err
		}
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Rotate(ct, kk, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct))
		s.newCt(res, out)
		return nil
	})
}

//export hl_rotate_hoisted
func hl_rotate_hoisted(sh, ch C.longlong, ks *C.longlong, n C.longlong, outs *C.longlong) *C.char {
	return sessionOp("rotate_hoisted", sh, func(s *Session) error {
		if err := s.needServer("rotate_hoisted"); err != nil {
			return err
		}
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		steps := int64s(ks, n)
		norm := make([]int, len(steps))
		var uniq []int
		seen := map[int]bool{}
		for i, k := range steps {
			norm[i] = s.normStep(k)
			if norm[i] != 0 && !seen[norm[i]] {
				if err := s.needGalois(norm[i], ct.Level()); err != nil {
					return err
				}
				seen[norm[i]] = true
				uniq = append(uniq, norm[i])
			}
		}
		res := map[int]*rlwe.Ciphertext{}
		for _, k := range uniq {
			res[k] = s.newCiphertext(ct.Level())
		}
		if len(uniq) > 0 {
			if err := s.eval.RotateHoisted(ct, uniq, res); err != nil {
				return err
			}
		}
		o := unsafe.Slice((*C.longlong)(unsafe.Pointer(outs)), int(n))
		used := map[int]bool{}
		for i, k := range norm {
			var r *rlwe.Ciphertext
			if k == 0 {
				r = ct.CopyNew()
			} else if used[k] {
				r = res[k].CopyNew()
			} else {
				r, used[k] = res[k], true
			}
			setScale(r.MetaData, scaleOf(ct))
			s.newCt(r, &o[i])
		}
		return nil
	})
}

func (s *Session) binaryArgs(ah, bh C.longlong, needSameScale bool) (*rlwe.Ciphertext, *rlwe.Ciphertext, error) {
	a, err := s.ctArg(ah, "first operand")
	if err != nil {
		return nil, nil, err
	}
	b, err := s.ctArg(bh, "second operand")
	if err != nil {
		return nil, nil, err
	}
	if a.Level() != b.Level() {
		return nil, nil, fmt.Errorf("level mismatch: %d vs %d (drop_level the higher one first)", a.Level(), b.Level())
	}
	if needSameScale && !sameScale(scaleOf(a), scaleOf(b)) {
		return nil, nil, fmt.Errorf("scale mismatch: %v (2^%.6f) vs %v (2^%.6f)",
			scaleOf(a), math.Log2(scaleOf(a)), scaleOf(b), math.Log2(scaleOf(b)))
	}
	return a, b, nil
}

func addSub(op string, sh, ah, bh C.longlong, out *C.longlong, sub bool) *C.char {
	return sessionOp(op, sh, func(s *Session) error {
		a, b, err := s.binaryArgs(ah, bh, true)
		if err != nil {
			return err
		}
		res := s.newCiphertext(a.Level())
		if sub {
			err = s.eval.Sub(a, b, res)
		} else {
			err = s.eval.Add(a, b, res)
		}
		if err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(a))
		s.newCt(res, out)
		return nil
	})
}

//export hl_add
func hl_add(sh, ah, bh C.longlong, out *C.longlong) *C.char {
	return addSub("add", sh, ah, bh, out, false)
}

//export hl_sub
func hl_sub(sh, ah, bh C.longlong, out *C.longlong) *C.char {
	return addSub("sub", sh, ah, bh, out, true)
}

//export hl_negate
func hl_negate(sh, ah C.longlong, out *C.longlong) *C.char {
	return sessionOp("negate", sh, func(s *Session) error {
		a, err := s.ctArg(ah, "ciphertext")
		if err != nil {
			return err
		}
		res := s.newCiphertext(a.Level())
		rq := s.p.ckks.RingQ().AtLevel(a.Level())
		for i := range a.Value {
			rq.Neg(a.Value[i], res.Value[i])
		}
		setScale(res.MetaData, scaleOf(a))
		s.newCt(res, out)
		return nil
	})
}

//export hl_add_plain
func hl_add_plain(sh, ch C.longlong, vals *C.double, n C.longlong, scale C.double, out *C.longlong) *C.char {
	return sessionOp("add_plain", sh, func(s *Session) error {
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		if !sameScale(float64(scale), scaleOf(ct)) {
			return fmt.Errorf("scale mismatch: plaintext %v vs ciphertext %v", float64(scale), scaleOf(ct))
		}
		pt, err := s.encode(float64s(vals, n), ct.Level(), scaleOf(ct))
		if err != nil {
			return err
		}
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Add(ct, pt, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct))
		s.newCt(res, out)
		return nil
	})
}

//export hl_mul_plain
func hl_mul_plain(sh, ch C.longlong, vals *C.double, n C.longlong, scale C.double, out *C.longlong) *C.char {
	return sessionOp("mul_plain", sh, func(s *Session) error {
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		pt, err := s.encode(float64s(vals, n), ct.Level(), float64(scale))
		if err != nil {
			return err
		}
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Mul(ct, pt, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct)*float64(scale))
		s.newCt(res, out)
		return nil
	})
}

func (s *Session) ctPt(ch, ph C.longlong) (*rlwe.Ciphertext, *rlwe.Plaintext, error) {
	ct, err := s.ctArg(ch, "ciphertext")
	if err != nil {
		return nil, nil, err
	}
	pt, err := s.ptArg(ph)
	if err != nil {
		return nil, nil, err
	}
	if pt.Level() != ct.Level() {
		return nil, nil, fmt.Errorf("level mismatch: ciphertext %d, plaintext %d", ct.Level(), pt.Level())
	}
	return ct, pt, nil
}

//export hl_mul_plain_pt
func hl_mul_plain_pt(sh, ch, ph C.longlong, out *C.longlong) *C.char {
	return sessionOp("mul_plain", sh, func(s *Session) error {
		ct, pt, err := s.ctPt(ch, ph)
		if err != nil {
			return err
		}
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Mul(ct, pt, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct)*pt.Scale.Float64())
		s.newCt(res, out)
		return nil
	})
}

// hl_mul_plain_acc adds ct * pt into acc in place (Lattigo's MulThenAdd: no product ciphertext
// is allocated, and the products of a linear op's giant step accumulate with lazy reduction):
// acc, ct and pt at one level, acc's scale ct's times pt's.
//
//export hl_mul_plain_acc
func hl_mul_plain_acc(sh, ah, ch, ph C.longlong) *C.char {
	return sessionOp("mul_plain_acc", sh, func(s *Session) error {
		ct, pt, err := s.ctPt(ch, ph)
		if err != nil {
			return err
		}
		acc, err := s.ctArg(ah, "accumulator")
		if err != nil {
			return err
		}
		if acc == ct {
			return fmt.Errorf("the accumulator must differ from the multiplied ciphertext")
		}
		if acc.Level() != ct.Level() || acc.Degree() != 1 {
			return fmt.Errorf("accumulator at level %d (degree %d), ciphertext at level %d", acc.Level(), acc.Degree(), ct.Level())
		}
		want := scaleOf(ct) * pt.Scale.Float64()
		if !sameScale(scaleOf(acc), want) {
			return fmt.Errorf("scale mismatch: accumulator %v, product %v", scaleOf(acc), want)
		}
		// MulThenAdd compares scales exactly (big.Float): label the accumulator with the exact
		// product for the call, then with its float64 value again, as every result here is
		acc.Scale = ct.Scale.Mul(pt.Scale)
		if err := s.eval.MulThenAdd(ct, pt, acc); err != nil {
			setScale(acc.MetaData, want)
			return err
		}
		setScale(acc.MetaData, want)
		return nil
	})
}

//export hl_add_plain_pt
func hl_add_plain_pt(sh, ch, ph C.longlong, out *C.longlong) *C.char {
	return sessionOp("add_plain", sh, func(s *Session) error {
		ct, pt, err := s.ctPt(ch, ph)
		if err != nil {
			return err
		}
		if !sameScale(pt.Scale.Float64(), scaleOf(ct)) {
			return fmt.Errorf("scale mismatch: plaintext %v vs ciphertext %v", pt.Scale.Float64(), scaleOf(ct))
		}
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Add(ct, pt, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct))
		s.newCt(res, out)
		return nil
	})
}

//export hl_add_const
func hl_add_const(sh, ch C.longlong, c C.double, out *C.longlong) *C.char {
	return sessionOp("add_const", sh, func(s *Session) error {
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		if math.IsNaN(float64(c)) || math.IsInf(float64(c), 0) {
			return fmt.Errorf("constant %v is not finite", float64(c))
		}
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Add(ct, float64(c), res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct))
		s.newCt(res, out)
		return nil
	})
}

// hl_mul_const multiplies by the integer round(c * scale) (exact, no
// encoding): the result scale is ct.scale * scale.
//
//export hl_mul_const
func hl_mul_const(sh, ch C.longlong, c C.double, scale C.double, out *C.longlong) *C.char {
	return sessionOp("mul_const", sh, func(s *Session) error {
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		if math.IsNaN(float64(c)) || math.IsInf(float64(c), 0) {
			return fmt.Errorf("constant %v is not finite", float64(c))
		}
		if err := checkScale(float64(scale), "scale"); err != nil {
			return err
		}
		f := new(big.Float).SetPrec(256).SetFloat64(float64(c))
		f.Mul(f, new(big.Float).SetPrec(256).SetFloat64(float64(scale)))
		if f.Sign() >= 0 {
			f.Add(f, big.NewFloat(0.5))
		} else {
			f.Sub(f, big.NewFloat(0.5))
		}
		m, _ := f.Int(nil)
		res := s.newCiphertext(ct.Level())
		if err := s.eval.Mul(ct, m, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(ct)*float64(scale))
		s.newCt(res, out)
		return nil
	})
}

//export hl_mul
func hl_mul(sh, ah, bh C.longlong, out *C.longlong) *C.char {
	return sessionOp("mul", sh, func(s *Session) error {
		if !s.hasRelin {
			return fmt.Errorf("no relinearization key in this key set")
		}
		a, b, err := s.binaryArgs(ah, bh, false)
		if err != nil {
			return err
		}
		res := s.newCiphertext(a.Level())
		if err := s.eval.MulRelin(a, b, res); err != nil {
			return err
		}
		setScale(res.MetaData, scaleOf(a)*scaleOf(b))
		s.newCt(res, out)
		return nil
	})
}

//export hl_rescale
func hl_rescale(sh, ch C.longlong, out *C.longlong) *C.char {
	return sessionOp("rescale", sh, func(s *Session) error {
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		l := ct.Level()
		if l == 0 {
			return fmt.Errorf("ciphertext is at level 0: no prime left to divide by (bootstrap first)")
		}
		q := s.p.ckks.Q()[l]
		ns := scaleOf(ct) / float64(q)
		if ns < 1 {
			return fmt.Errorf("scale %v / q_%d=%d = %v < 1 would destroy the message", scaleOf(ct), l, q, ns)
		}
		res := ckks.NewCiphertext(s.p.ckks, 1, l)
		if err := s.eval.Rescale(ct, res); err != nil {
			return err
		}
		if res.Level() != l-1 {
			return fmt.Errorf("Lattigo rescaled to level %d, expected %d", res.Level(), l-1)
		}
		setScale(res.MetaData, ns)
		s.newCt(res, out)
		return nil
	})
}

//export hl_drop_level
func hl_drop_level(sh, ch C.longlong, to C.int, out *C.longlong) *C.char {
	return sessionOp("drop_level", sh, func(s *Session) error {
		ct, err := s.ctArg(ch, "ciphertext")
		if err != nil {
			return err
		}
		if int(to) < 0 || int(to) > ct.Level() {
			return fmt.Errorf("cannot go from level %d to level %d (only down, not below 0)", ct.Level(), int(to))
		}
		res := ct.CopyNew()
		s.eval.DropLevel(res, ct.Level()-int(to))
		s.newCt(res, out)
		return nil
	})
}

// hl_zero: a ciphertext of zero at (level, scale).  encrypted=0 gives the
// trivial ciphertext (0, 0) (exact, costs nothing, fine as an accumulator);
// encrypted=1 a fresh public-key encryption of zero.
//
//export hl_zero
func hl_zero(sh C.longlong, level C.int, scale C.double, encrypted C.int, out *C.longlong) *C.char {
	return sessionOp("zero", sh, func(s *Session) error {
		if err := s.checkLevel(int(level), "level"); err != nil {
			return err
		}
		if err := checkScale(float64(scale), "scale"); err != nil {
			return err
		}
		ct := s.newCiphertext(int(level))
		if encrypted != 0 {
			if err := s.encPk.EncryptZero(ct); err != nil {
				return err
			}
			ct.LogDimensions = ring.Dimensions{Rows: 0, Cols: s.p.logSlots}
		}
		setScale(ct.MetaData, float64(scale))
		s.newCt(ct, out)
		return nil
	})
}

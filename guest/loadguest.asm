; loadguest.asm: a tiny BIOS-booted guest whose CPU load is controlled.
;
; Build: nasm -f bin -o loadguest.img loadguest.asm   (2 KiB raw disk image)
;
; How the load is made (see README.md): the PIT ticks at 20 Hz; a period is 2
; ticks (100 ms). For each period the guest owes itself LOAD% of the period as
; CPU time ("credit"). It spins in small steps (M loop iterations, ~20-50 us)
; and reads the PIT counter (0.84 us resolution) after every step. The time
; between two reads is the guest's own CPU time, UNLESS it is longer than
; GAP (~0.5 ms): then the vCPU was descheduled by the host (a time slice of
; another thread is >= ~0.75 ms) and only a normal step is counted. So the
; guest counts the CPU it actually got, not wall time: it spins until it has
; had LOAD% of the period, then halts until the next tick. If the period ends
; first (pCPU shared), the unfinished part is dropped and it keeps spinning
; on the new period's credit without halting: it is runnable exactly while it
; is short of its share, so the host scheduler splits a shared pCPU fairly and
; keeps it ~100% busy. LOAD 0 halts always, LOAD 100 never halts.
;
; Parameters: the phase table at offset PHASE_OFF (0x600), patched by
; scripts/testbed: magic "LDPH", count (u8), then count entries of
; {load: u8 0..100, secs: u16 LE}. Phases run in order; the LAST phase lasts
; forever (its secs is ignored). count 0 = idle forever.
;
; Serial (COM1): once per second a line
;   " L<load> P<phase> M<iterations/step> S<step, PIT counts> G<gaps> T<ticks>"
; in hex; G = descheduled gaps seen in that second (host contention).

bits 16
org 0x7c00

SECTORS     equ 4               ; image size in sectors
PHASE_OFF   equ 0x600           ; offset of the phase table in the image
PHASES      equ 0x7c00 + PHASE_OFF
PIT_DIV     equ 59659           ; 1193182 / 59659 = 20.000 Hz
TICKS_PER_PERIOD equ 2          ; 100 ms periods
TICKS_PER_SEC    equ 20
PERIOD_PCT  equ 1193            ; PIT counts of 1% of a period (119318 / 100)
GAP         equ 600             ; a step longer than this (~0.5 ms): descheduled
STEP_MIN    equ 24              ; calibrate M so that a step takes >= ~20 us

; variables in free low memory (0x500..0x5ff)
ticks   equ 0x500       ; dd, incremented by IRQ0
msteps  equ 0x504       ; dd, spin iterations per step (M)
credit  equ 0x508       ; dd signed, PIT counts of CPU still owed this period
pend    equ 0x50c       ; dd, tick at which the current period ends
phend   equ 0x510       ; dd, tick at which the current phase ends
lastrep equ 0x514       ; dd, tick of the last report
gaps    equ 0x518       ; dd, gaps since the last report
good    equ 0x51c       ; dd, the last normal step (PIT counts)
prev    equ 0x520       ; dw, PIT counter at the previous read
valid   equ 0x522       ; db, prev is valid (we did not halt since)
load    equ 0x523       ; db, current load 0..100
phase   equ 0x524       ; db, current phase index

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    jmp 0:init
init:
    cld
    ; the BIOS loaded sector 1; load the rest (sectors 2..SECTORS) at 0x7e00
    mov ax, 0x0200 + SECTORS - 1    ; read, SECTORS-1 sectors
    mov cx, 0x0002                  ; cylinder 0, sector 2
    xor dh, dh                      ; head 0 (dl = boot drive from the BIOS)
    mov bx, 0x7e00
    int 0x13
    jnc init2
.dead:                              ; cannot read: halt forever, never reboot
    cli
    hlt
    jmp .dead

    times 510 - ($ - $$) db 0
    dw 0xaa55

; ---------------------------------------------------------------------------
; sector 2 onwards
init2:
    xor ax, ax
    mov di, 0x500
    mov cx, 0x80
    rep stosw                   ; zero the variables
    mov word [8*4], irq0        ; IVT entry 8 = IRQ0 (the BIOS maps the PIC at 8)
    mov word [8*4+2], 0
    mov al, 0x34                ; PIT ch0, lo/hi byte, mode 2, binary
    out 0x43, al
    mov ax, PIT_DIV
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov al, 0xfe                ; unmask IRQ0 only
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    sti

    ; --- calibrate M: double it until a step takes >= STEP_MIN counts -------
    ; (re-checked at every step in the main loop: M only grows)
    mov dword [msteps], 16
.cal:
    call readpit
    mov [prev], ax
    call step
    cmp eax, STEP_MIN
    jae .caldone
    cmp dword [msteps], 0x1000000
    jae .caldone
    shl dword [msteps], 1
    jmp .cal
.caldone:
    mov [good], eax

    ; --- first phase ---------------------------------------------------------
    mov eax, [ticks]
    mov [lastrep], eax
    inc eax
    mov [pend], eax             ; the first period starts at the next tick
    mov byte [phase], 0xff
    call nextphase
    call report                 ; the first line: booted and calibrated

main:
    mov eax, [ticks]
    cmp eax, [pend]
    jb .inperiod
    ; ---- new period ----
    add dword [pend], TICKS_PER_PERIOD
    cmp eax, [pend]
    jb .pendok
    lea edx, [eax + TICKS_PER_PERIOD]    ; far behind (paused): resync
    mov [pend], edx
.pendok:
    cmp eax, [phend]
    jb .samephase
    call nextphase
.samephase:
    ; drop unfinished work (credit > 0), keep a small overshoot (credit < 0)
    cmp dword [credit], 0
    jle .over
    mov dword [credit], 0
.over:
    cmp dword [credit], -GAP
    jge .keep
    mov dword [credit], -GAP
.keep:
    movzx eax, byte [load]
    imul eax, eax, PERIOD_PCT
    add [credit], eax
    ; report once a second
    mov eax, [ticks]
    sub eax, [lastrep]
    cmp eax, TICKS_PER_SEC
    jb .inperiod
    add [lastrep], eax
    call report
.inperiod:
    cmp byte [load], 100
    jae .spin
    cmp dword [credit], 0
    jg .spin
    mov byte [valid], 0         ; halting: the next step starts a new measure
    sti
    hlt
    jmp main
.spin:
    cmp byte [valid], 0
    jne .measured
    call readpit
    mov [prev], ax
    mov byte [valid], 1
.measured:
    call step
    cmp eax, GAP
    jbe .normal
    inc dword [gaps]
    mov eax, [good]             ; descheduled: count a normal step only
    jmp .count
.normal:
    mov [good], eax
    cmp eax, STEP_MIN           ; steps too short (M calibrated while the
    jae .count                  ; code was being translated, or slowed):
    cmp dword [msteps], 0x1000000   ; make them longer
    jae .count
    shl dword [msteps], 1
.count:
    sub [credit], eax
    jmp main

; step: spin M iterations, read the PIT; eax = PIT counts since [prev]
; (modulo one PIT period), [prev] updated.
step:
    mov ecx, [msteps]
.l: dec ecx
    jnz .l
    call readpit
    mov dx, [prev]
    mov [prev], ax
    sub dx, ax                  ; the counter counts down
    jae .nowrap
    add dx, PIT_DIV             ; it reloaded in between
.nowrap:
    movzx eax, dx
    ret

; nextphase: advance to the next phase (the last one lasts forever)
nextphase:
    mov bl, [phase]
    inc bl
    cmp bl, [PHASES + 4]        ; count
    jae .forever
    mov [phase], bl
    movzx esi, bl
    lea esi, [esi + esi*2]
    mov al, [PHASES + 5 + esi]
    cmp al, 100
    jbe .lok
    mov al, 100
.lok:
    mov [load], al
    movzx eax, word [PHASES + 6 + esi]
    imul eax, eax, TICKS_PER_SEC
    add eax, [ticks]
    mov [phend], eax
    mov al, [phase]
    inc al
    cmp al, [PHASES + 4]
    jb .ret
.forever:
    mov dword [phend], 0xffffffff
.ret:
    ret

readpit:                        ; ax = PIT ch0 counter
    mov al, 0                   ; latch ch0
    out 0x43, al
    in al, 0x40
    mov ah, al
    in al, 0x40
    xchg al, ah
    ret

report:
    mov bl, 'L'
    movzx eax, byte [load]
    call hexl
    mov bl, 'P'
    movzx eax, byte [phase]
    call hexl
    mov bl, 'M'
    mov eax, [msteps]
    call hexl
    mov bl, 'S'
    mov eax, [good]
    call hexl
    mov bl, 'G'
    xor eax, eax
    xchg eax, [gaps]
    call hexl
    mov bl, 'T'
    mov eax, [ticks]
    call hexl
    mov al, 13
    call putc
    mov al, 10
    ; fall through
putc:
    mov dx, 0x3f8
    out dx, al
    ret

; hexl: print " ", the letter in bl, then eax in hex
hexl:
    push eax
    mov al, ' '
    call putc
    mov al, bl
    call putc
    pop eax
    mov cx, 8
.h: rol eax, 4
    push eax
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe .d
    add al, 7
.d: call putc
    pop eax
    loop .h
    ret

irq0:
    inc dword [cs:ticks]
    push ax
    mov al, 0x20                ; EOI
    out 0x20, al
    pop ax
    iret

    times PHASE_OFF - ($ - $$) db 0
; ---------------------------------------------------------------------------
; the phase table, patched by scripts/testbed (see README.md)
phases:
    db "LDPH"
    db 1                        ; count
    db 50                       ; load % (the default image: 50% forever)
    dw 0                        ; secs
    times SECTORS * 512 - ($ - $$) db 0
